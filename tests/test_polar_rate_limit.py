"""A 429 to one call pauses every call of the client until its Retry-After has passed: a batch
of workers slows down together instead of each finding Polar's limit again (SPEC 5.3: rate
limits slow a batch down, never double it)."""
import asyncio
import time

from services.polar import PolarClient

from .fakes.polar_server import TOKEN


def test_a_429_pauses_the_other_calls_of_the_client_until_retry_after(polar):
    polar.add_customer("c-1")
    polar.fail("GET", "/v1/orders/", status=429, retry_after="1")

    async def go():
        client = PolarClient(polar.url, TOKEN, backoff=0.01)
        try:
            t0 = time.monotonic()
            first = asyncio.create_task(client.orders("c-1"))
            while client.rate_limited == 0:  # the first call has met the limit
                await asyncio.sleep(0.01)
            await client.refunds_for_order("o-unknown")  # another worker's call meanwhile
            second_done = time.monotonic() - t0
            await first
            return second_done, client.rate_limited
        finally:
            await client.close()

    second_done, limited = asyncio.run(go())
    assert limited == 1
    assert second_done >= 0.95  # it waited out the Retry-After rather than going straight in
    sent = [(r.method, r.path) for r in polar.server.requests]
    assert sent.count(("GET", "/v1/orders/")) == 2  # the 429 and its one retry: nothing more
    assert sent.count(("GET", "/v1/refunds/")) == 1
