"""A throttle remediation puts its customers on the watchlist when approved. A crash (or a
database blip in the watchlist) between the approval's commit and the watchlist must not leave
them unwatched: the batch is resumed, and so must its watchlist be."""
import asyncio
from datetime import datetime, timezone

from services.remediation import batch_ticket

from .seed import instance, record, throttle
from .test_remediation_batch import World


def seed_throttle(db, polar):
    for c in range(2):
        cust, org, iid = f"c-t{c}", f"o-t{c}", f"i-t{c}"
        polar.add_customer(cust)
        polar.add_order(cust, datetime(2026, 11, 1, 0, 5, tzinfo=timezone.utc), 100_00)
        throttle(db, org, None, "1 hour", None)
        instance(db, iid, org=org, customer=cust, tier="small", heartbeat="2026-12-31 00:00")
        record(db, 100 + c, iid, "2026-10-05 08:00", "2026-10-05 11:00", "0.249", tier="small", rate="0.083",
               org=org, customer=cust)


def test_a_crash_before_the_watchlist_is_resumed_with_it(db, db_url, polar):
    seed_throttle(db, polar)

    async def crash():
        async with World(db_url, polar) as w:
            batch, _ = await w.remediation.propose("throttle_daily", "2026-10", "U1", "C1")

            async def dies(*a, **kw):
                raise ConnectionError("the replica died after the approval committed")
            w.remediation._watch = dies
            try:
                await w.remediation.approve(batch["id"], "U_LEAD")
            except ConnectionError:
                pass
            return batch["id"]

    async def restart(batch_id):
        async with World(db_url, polar) as w:
            assert await w.remediation.resume() == [batch_id]
            await w.issuer.drain(30)
            return await w.remediation.progress(batch_id), await w.remediation.watchlist.list()

    batch_id = asyncio.run(crash())
    progress, watched = asyncio.run(restart(batch_id))
    assert progress.issued == 2
    assert {(x["customer_id"], x["reason"]) for x in watched} == {
        (f"c-t{c}", f"{batch_ticket(batch_id)}: throttle_daily 2026-10 remediated") for c in range(2)}
