"""Attack 4: PolarMemo (services/investigation.py), the customer and usage-event reads shared by
the checks of one run over many instances, and the client-wide 429 pause (services/polar.py)."""
import asyncio
import gc
import time

import httpx

from services.investigation import PolarMemo
from services.polar import PolarClient, PolarUnavailable


class SlowPolar:
    def __init__(self, delay_s: float, fail: bool = False):
        self.delay_s, self.fail, self.calls = delay_s, fail, 0

    async def _answer(self, value):
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise PolarUnavailable("503 Service Unavailable")
        return value

    async def customer_by_external_id(self, customer_id):
        return await self._answer({"id": f"p-{customer_id}"})

    async def usage_events_of_customers(self, customer_ids, name):
        return await self._answer({c: {"i-1": [f"{name}:{c}"]} for c in customer_ids})


def test_a_check_that_times_out_does_not_cancel_the_read_other_checks_share():
    async def go():
        polar = SlowPolar(0.2)
        memo = PolarMemo(polar, "usage")
        first = asyncio.wait_for(memo.customer("c-1"), 0.02)  # this check's source timeout
        second = memo.customer("c-1")
        a, b = await asyncio.gather(first, second, return_exceptions=True)
        return polar.calls, a, b

    calls, a, b = asyncio.run(go())
    assert calls == 1 and isinstance(a, asyncio.TimeoutError)
    assert b == {"id": "p-c-1"}


def test_a_shared_read_failing_after_its_only_waiter_gave_up_leaks_no_unretrieved_exception():
    seen = []

    async def go():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: seen.append(ctx.get("message")))
        memo = PolarMemo(SlowPolar(0.05, fail=True), "usage")
        try:
            await asyncio.wait_for(memo.customer("c-1"), 0.01)
        except asyncio.TimeoutError:
            pass
        await asyncio.sleep(0.1)  # the shared read fails with nobody waiting on it
        del memo
        gc.collect()
        await asyncio.sleep(0)

    asyncio.run(go())
    gc.collect()
    assert not [m for m in seen if "never retrieved" in (m or "")], seen


def test_a_failed_shared_read_reaches_every_check_of_the_customer_as_an_exception():
    async def go():
        polar = SlowPolar(0.01, fail=True)
        memo = PolarMemo(polar, "usage")
        out = await asyncio.gather(*(memo.events_of("c-1") for _ in range(5)), return_exceptions=True)
        return polar.calls, out

    calls, out = asyncio.run(go())
    assert calls == 1 and all(isinstance(o, PolarUnavailable) for o in out)


def test_the_pause_of_a_429_does_not_hold_a_refund_post():
    """A 429 to a read pauses every call of the client, but not the refund POST: the issuer waits
    the pause out before it records the POST's attempt (services/issuing.py), so the POST must go
    out at once, within its in-flight window."""
    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append((request.method, time.monotonic()))
        if request.method == "GET":
            return httpx.Response(429, headers={"Retry-After": "2"}, json={"error": "TooManyRequests"})
        return httpx.Response(201, json={"id": "r-1", "status": "succeeded"})

    async def go():
        client = PolarClient("http://polar.test", "t", attempts=1, transport=httpx.MockTransport(handler))
        try:
            await client.orders("c-1")
        except PolarUnavailable:
            pass
        t0 = time.monotonic()
        await client.create_refund({"order_id": "o-1", "amount": 1, "reason": "duplicate", "metadata": {}})
        posted = time.monotonic() - t0
        t1 = time.monotonic()
        await client.wait_rate_limit()
        waited = time.monotonic() - t1
        await client.close()
        return posted, waited

    posted, waited = asyncio.run(go())
    assert posted < 0.5, f"the refund POST waited {posted:.2f} s on the pause after its attempt was recorded"
    assert 1.0 < waited <= 2.1  # what the issuer waits before it records the attempt
