"""A remediation batch through the services (SPEC 5.3): one approval bound to the plan's
fingerprint, one case per customer over its instances, each issued exactly once through SPEC 4,
one corrections row per customer with the batch as ticket; a changed record supersedes the plan;
a crash while the cases are opened is resumed without crediting anyone twice."""
import asyncio
from datetime import date, datetime, timezone

import psycopg

from handlers.cases import authority_from_levels
from services.case_evidence import Scope
from services.cases import CaseService, CheckRequest
from services.config import parse_config
from services.credits_report import credits_report
from services.db import Database
from services.investigation import Investigator
from services.issuing import Issuer
from services.polar import PolarClient
from services.remediation import RemediationService, batch_ticket
from services.store import Batches, CaseStore, Watchlist

from .fakes.polar_server import TOKEN
from .seed import instance, record
from .test_issuing import Recorder

CONFIG = parse_config({"levels": {1: {"users": ["U1"]}, 2: {"users": ["U_LEAD"]}, 4: {"users": ["U_VP"]}}})


async def authority(user):
    levels = tuple(n for n, lv in CONFIG.levels.items() if user in lv.users)
    return authority_from_levels(CONFIG, user, levels)


def seed_customers(db, polar, n=4, instances_each=2):
    """n customers, each with instances_each instances billed twice for the same October hour
    (an exact duplicate: $2.08 of duplicate_charge per instance), plus one wrong-tier hour on
    the first instance (another kind: listed by the plan, not credited by it)."""
    rid = 1
    for c in range(n):
        cust = f"c-{c:02d}"
        polar.add_customer(cust, email=f"{cust}@example.com", name=f"Customer {c}")
        polar.add_order(cust, datetime(2026, 11, 1, 0, 5, tzinfo=timezone.utc), 100_00)
        for k in range(instances_each):
            iid = f"i-{c:02d}-{k}"
            instance(db, iid, org=f"o-{c:02d}", customer=cust, tier="gpu")
            for _ in range(2):
                record(db, rid, iid, "2026-10-05 08:00", "2026-10-05 09:00", "2.08", org=f"o-{c:02d}", customer=cust)
                rid += 1
        record(db, rid, f"i-{c:02d}-0", "2026-10-06 08:00", "2026-10-06 09:00", "2.08", tier="gpu", rate="2.08",
               org=f"o-{c:02d}", customer=cust)
        rid += 1
        db.execute("UPDATE instances SET tier = 'small' WHERE instance_id = %s", (f"i-{c:02d}-0",))
    return rid


class World:
    def __init__(self, db_url, polar):
        self.db_url, self.polar = db_url, polar

    async def __aenter__(self):
        self.db = await Database.connect(self.db_url)
        self.service = CaseService(CaseStore(self.db), Investigator(CONFIG, self.db), CONFIG, authority)
        await self.service.store.migrate()
        self.client = PolarClient(self.polar.url, TOKEN, backoff=0.05)
        self.rec = Recorder()
        self.issuer = Issuer(self.service, self.client, CONFIG, self.rec, lookup_delay_s=0.05)
        self.service.issuer = self.issuer
        self.batches = Batches(self.db)
        self.remediation = RemediationService(self.service, self.batches, Watchlist(self.db))
        return self

    async def __aexit__(self, *exc):
        await self.issuer.drain(30)
        await self.client.close()
        await self.db.close()


def rows(db_url, sql, args=()):
    with psycopg.connect(db_url) as conn:
        return conn.execute(sql, args).fetchall()


def test_one_approval_credits_every_customer_once_over_all_their_instances(db, db_url, polar):
    seed_customers(db, polar, n=4, instances_each=2)

    async def go():
        async with World(db_url, polar) as w:
            batch, plan = await w.remediation.propose("duplicate_charge", "2026-10", "U1", "C1")
            assert [c.credit_cents for c in plan.customers] == [416] * 4 and plan.total_cents == 1664
            assert plan.other_kinds == {"wrong_tier": 4}
            assert batch["required_level"] == 1
            refused = await w.remediation.approve(batch["id"], "U_NOBODY")
            assert refused.status == "refused" and refused.needed_level == 1
            out = await w.remediation.approve(batch["id"], "U1")
            assert out.ok, out
            again = await w.remediation.approve(batch["id"], "U_LEAD")  # a double click, another approver
            assert again.status == "refused" and "already approved" in again.reason
            await w.issuer.drain(30)
            return out, await w.remediation.progress(batch["id"])

    out, progress = asyncio.run(go())
    assert len(out.cases) == 4
    assert all(c.instance_id is None and len(c.instance_ids) == 2 and c.batch_id == out.batch["id"] for c in out.cases)
    assert progress.issued == 4 and progress.issued_cents == 1664 and progress.done
    assert progress.headline().startswith("4 of 4 issued ($16.64)")
    refunds = list(polar.refunds)
    assert sorted((r["order_id"], r["amount"]) for r in refunds) == sorted((o["id"], 416) for o in polar.orders)
    assert all(r["metadata"]["batch_id"] == str(out.batch["id"]) for r in refunds)
    corr = rows(db_url, "SELECT customer_id, ticket_id, credit_amount FROM billing_corrections ORDER BY customer_id")
    assert [(c, t, str(a)) for c, t, a in corr] == [(f"c-{i:02d}", batch_ticket(out.batch["id"]), "4.16")
                                                   for i in range(4)]
    # the weekly review shows the batch as one line: its count and its total
    async def review():
        async with World(db_url, polar) as w:
            return await credits_report(w.service.store, date(2026, 1, 1))
    report = asyncio.run(review())
    name = batch_ticket(out.batch["id"])
    assert report.batches == [(name, "duplicate_charge 2026-10", 4, 1664)]
    assert f"  {name} (duplicate_charge 2026-10): 4 customer(s), $16.64" in report.as_text().splitlines()
    # the wrong-tier hour is still free for its own case: a check of the instance credits it
    async def later():
        async with World(db_url, polar) as w:
            one = await w.service.open(CheckRequest("i-00-0", ["2026-10"], "U1"))
            return one.case
    case = asyncio.run(later())
    assert case.kinds == ("wrong_tier",) and case.state == "pending"


def test_a_record_changed_before_the_approval_supersedes_the_plan(db, db_url, polar):
    rid = seed_customers(db, polar, n=3, instances_each=1)

    async def go():
        async with World(db_url, polar) as w:
            batch, plan = await w.remediation.propose("duplicate_charge", "2026-10", "U1", "C1")
            # a third copy of one hour arrives before anyone approves
            record(db, rid, "i-01-0", "2026-10-05 08:00", "2026-10-05 09:00", "2.08", org="o-01", customer="c-01")
            out = await w.remediation.approve(batch["id"], "U_LEAD")
            old = await w.batches.get(batch["id"])
            return plan, out, old

    plan, out, old = asyncio.run(go())
    assert out.status == "changed" and old["state"] == "superseded" and old["superseded_by"] == out.batch["id"]
    assert out.plan.total_cents == plan.total_cents + 208
    assert rows(db_url, "SELECT count(*) FROM billing_bot.cases")[0][0] == 0
    assert polar.refunds == []


def test_a_customer_with_an_open_case_over_that_time_is_left_out_and_said_so(db, db_url, polar):
    seed_customers(db, polar, n=3, instances_each=1)

    async def go():
        async with World(db_url, polar) as w:
            mine = await w.service.open(CheckRequest("i-02-0", ["2026-10"], "U1"))
            batch, plan = await w.remediation.propose("duplicate_charge", "2026-10", "U1", "C1")
            return mine.case, plan

    mine, plan = asyncio.run(go())
    assert [c.customer_id for c in plan.customers] == ["c-00", "c-01"]
    assert plan.held == (("c-02", "i-02-0", mine.id, "pending"),)


def test_a_crash_while_opening_is_resumed_and_credits_each_customer_once(db, db_url, polar):
    seed_customers(db, polar, n=5, instances_each=1)

    async def crash():
        async with World(db_url, polar) as w:
            batch, _ = await w.remediation.propose("duplicate_charge", "2026-10", "U1", "C1")
            real = w.remediation._open_one
            calls = 0

            async def dies_after_two(*a, **kw):
                nonlocal calls
                calls += 1
                if calls > 2:
                    raise ConnectionError("the replica died")
                return await real(*a, **kw)
            w.remediation._open_one = dies_after_two
            out = await w.remediation.approve(batch["id"], "U_LEAD")
            await w.issuer.drain(30)
            return batch["id"], out

    async def restart(batch_id):
        async with World(db_url, polar) as w:
            assert await w.remediation.resume() == [batch_id]
            assert await w.remediation.resume() == []  # done: nothing opened twice
            await w.issuer.drain(30)
            await w.issuer.resume_unfinished()
            return await w.remediation.progress(batch_id)

    batch_id, out = asyncio.run(crash())
    assert out.ok and len(out.cases) == 2
    progress = asyncio.run(restart(batch_id))
    assert progress.issued == 5 and progress.done
    per_customer = rows(db_url, "SELECT customer_id, count(*) FROM billing_corrections GROUP BY 1 ORDER BY 1")
    assert per_customer == [(f"c-{i:02d}", 1) for i in range(5)]
    assert len(polar.refunds) == 5


def test_a_customer_check_opens_one_case_over_its_instances(db, db_url, polar):
    seed_customers(db, polar, n=1, instances_each=3)

    async def go():
        async with World(db_url, polar) as w:
            scope = Scope("c-00", ("i-00-0", "i-00-1", "i-00-2"), ("2026-10",), multi=True)
            first = await w.service.open_scope(scope, CheckRequest("", ["2026-10"], "U1"))
            second = await w.service.open_scope(scope, CheckRequest("", ["2026-10"], "U1"))
            single = await w.service.open(CheckRequest("i-00-1", ["2026-10"], "U1"))
            approved = await w.service.approve(first.case.id, "U_LEAD")
            await w.issuer.drain(30)
            return first, second, single, approved, await w.service.store.get(first.case.id)

    first, second, single, approved, final = asyncio.run(go())
    assert first.ok and first.case.instance_id is None and first.case.instances == ("i-00-0", "i-00-1", "i-00-2")
    # 3 x $2.08 duplicates + i-00-0's two remaining gpu-billed hours at the small rate (2 x $1.997)
    assert first.case.credit_cents == 3 * 208 + 399
    assert second.status == "existing" and second.case.id == first.case.id
    assert single.status == "existing" and single.case.id == first.case.id
    assert approved.ok and final.state == "issued" and final.issued_cents == first.case.credit_cents


def test_an_org_check_opens_one_case_per_customer(db, db_url, polar):
    seed_customers(db, polar, n=2, instances_each=2)
    db.execute("UPDATE billing_records SET org_id = 'o-shared'")
    db.execute("UPDATE instances SET org_id = 'o-shared'")

    async def go():
        async with World(db_url, polar) as w:
            outs = await w.service.open_org("o-shared", CheckRequest("", ["2026-10"], "U1"))
            none = await w.service.open_customer("c-nobody", CheckRequest("", ["2026-10"], "U1"))
            return outs, none

    outs, none = asyncio.run(go())
    assert [(o.status, o.case.customer_id, o.case.instances) for o in outs] == [
        ("done", "c-00", ("i-00-0", "i-00-1")), ("done", "c-01", ("i-01-0", "i-01-1"))]
    assert all(o.case.report["scope"] == "org" and o.case.report["instance_id"] is None for o in outs)
    assert none[0].status == "refused" and "no billing records" in none[0].reason


def test_a_throttle_remediation_puts_its_customers_on_the_watchlist(db, db_url, polar):
    from .seed import throttle
    for c in range(2):
        cust, org, iid = f"c-t{c}", f"o-t{c}", f"i-t{c}"
        polar.add_customer(cust)
        polar.add_order(cust, datetime(2026, 11, 1, 0, 5, tzinfo=timezone.utc), 100_00)
        throttle(db, org, None, "1 hour", None)  # the daily limit that failed to pause anyone
        instance(db, iid, org=org, customer=cust, tier="small", heartbeat="2026-12-31 00:00")
        record(db, 100 + c, iid, "2026-10-05 08:00", "2026-10-05 11:00", "0.249", tier="small", rate="0.083",
               org=org, customer=cust)

    async def go():
        async with World(db_url, polar) as w:
            batch, plan = await w.remediation.propose("throttle_daily", "2026-10", "U1", "C1")
            out = await w.remediation.approve(batch["id"], "U_LEAD")
            return plan, out, await w.remediation.watchlist.list()

    plan, out, watched = asyncio.run(go())
    assert out.ok and [c.customer_id for c in plan.customers] == ["c-t0", "c-t1"]
    assert [c.credit_cents for c in plan.customers] == [17, 17]  # 2 of 3 hours at $0.083, each rounded once
    assert {(w["customer_id"], w["reason"]) for w in watched} == {
        (f"c-t{c}", f"{batch_ticket(out.batch['id'])}: throttle_daily 2026-10 remediated") for c in range(2)}


def test_a_batch_with_a_failed_case_stays_followed_until_the_retry_is_issued(db, db_url, polar):
    """A failure can still be retried: the batch is not finished, so the progress message follows it."""
    seed_customers(db, polar, n=2, instances_each=1)
    polar.orders.pop()  # c-01 has no order for October: its refund fails ("not invoiced yet")

    async def go():
        async with World(db_url, polar) as w:
            batch, _ = await w.remediation.propose("duplicate_charge", "2026-10", "U1", "C1")
            await w.remediation.approve(batch["id"], "U1")
            await w.issuer.drain(30)
            p = await w.remediation.progress(batch["id"])
            assert len(p.failed) == 1 and p.done
            assert await w.batches.claim_progress(batch["id"], p.headline(), p.settled)  # what the bot's loop does
            failed = p.failed[0]
            out = await w.service.retry(failed.case_id, "U1", failed.failures, switch=True)  # as invoice credit
            assert out.ok, out
            await w.issuer.drain(30)
            assert (await w.remediation.progress(batch["id"])).issued == 2
            # the progress message must be brought up to date: the batch must still be listed
            return [b["id"] for b in await w.batches.unfinished()], batch["id"]

    unfinished, batch_id = asyncio.run(go())
    assert batch_id in unfinished
