"""Attacks on who may approve a remediation batch (SPEC 3, 5.3): one level too low, four-eyes,
and exposure (a customer with other recent credits: its case in the batch needs the level its
credit plus exposure needs, whoever approved the plan's total)."""
import asyncio
from dataclasses import replace
from datetime import datetime, timezone

from services.cases import CheckRequest

from .seed import instance, record
from .test_remediation_batch import World, rows, seed_customers


def seed_big(db, polar, n=2, charge="30.00"):
    """n customers, one instance each, one hour billed twice at `charge` (a duplicate of charge)."""
    for c in range(n):
        cust, org, iid = f"c-{c:02d}", f"o-{c:02d}", f"i-{c:02d}-0"
        polar.add_customer(cust)
        polar.add_order(cust, datetime(2026, 11, 1, 0, 5, tzinfo=timezone.utc), 1000_00)
        instance(db, iid, org=org, customer=cust, tier="gpu")
        for k in range(2):
            record(db, 100 + 2 * c + k, iid, "2026-10-05 08:00", "2026-10-05 09:00", charge, rate=charge,
                   org=org, customer=cust)


def test_one_level_too_low_is_refused_and_nothing_is_opened(db, db_url, polar):
    seed_big(db, polar, n=2, charge="30.00")  # $60.00 in all: level 2

    async def go():
        async with World(db_url, polar) as w:
            batch, plan = await w.remediation.propose("duplicate_charge", "2026-10", "U_LEAD", "C1")
            low = await w.remediation.approve(batch["id"], "U1")
            low_reject = await w.remediation.reject(batch["id"], "U1", "I say no")
            ok = await w.remediation.approve(batch["id"], "U_LEAD")  # four-eyes is off: the requester may
            await w.issuer.drain(30)
            return batch, plan, low, low_reject, ok

    batch, plan, low, low_reject, ok = asyncio.run(go())
    assert plan.total_cents == 6000 and batch["required_level"] == 2
    assert low.status == "refused" and low.needed_level == 2
    assert low_reject.status == "refused" and low_reject.needed_level == 2
    assert ok.ok and all(c.state == "approved" for c in ok.cases)
    assert len(polar.refunds) == 2


def test_four_eyes_the_requester_cannot_approve_or_reject_the_plan(db, db_url, polar):
    seed_customers(db, polar, n=2, instances_each=1)

    async def go():
        async with World(db_url, polar) as w:
            cfg = replace(w.service.config, four_eyes=True)
            w.service.config = cfg
            batch, _ = await w.remediation.propose("duplicate_charge", "2026-10", "U_LEAD", "C1")
            own = await w.remediation.approve(batch["id"], "U_LEAD")
            own_reject = await w.remediation.reject(batch["id"], "U_LEAD", "changed my mind")
            other = await w.remediation.approve(batch["id"], "U1")
            await w.issuer.drain(30)
            return own, own_reject, other

    own, own_reject, other = asyncio.run(go())
    assert own.status == "refused" and "four-eyes" in own.reason
    assert own_reject.status == "refused" and "four-eyes" in own_reject.reason
    assert other.ok and [c.decided_by for c in other.cases] == ["U1", "U1"]
    assert all(c.requested_by == "U_LEAD" for c in other.cases)


def seed_exposure(db):
    """c-00 has another instance with a $49.92 wrong-tier credit in September (not the batch's period)."""
    instance(db, "i-00-x", org="o-00", customer="c-00", tier="small")
    record(db, 900, "i-00-x", "2026-09-05 08:00", "2026-09-05 09:00", "50.00", rate="50.00", org="o-00",
           customer="c-00")


def test_exposure_keeps_a_customers_batch_case_for_a_higher_level(db, db_url, polar):
    """U1 (up to $50.00) may approve the plan's $8.32; c-00's case is $4.16, but with c-00's other
    pending $49.92 it needs level 2: it must not be approved by the batch's level-1 approval."""
    seed_customers(db, polar, n=2, instances_each=2)
    seed_exposure(db)

    async def go():
        async with World(db_url, polar) as w:
            other = await w.service.open(CheckRequest("i-00-x", ["2026-09"], "U1"))
            batch, plan = await w.remediation.propose("duplicate_charge", "2026-10", "U_LEAD", "C1")
            out = await w.remediation.approve(batch["id"], "U1")
            await w.issuer.drain(30)
            return other, plan, out, await w.remediation.progress(batch["id"])

    other, plan, out, progress = asyncio.run(go())
    assert other.case.credit_cents == 4992 and other.case.state == "pending"
    assert plan.total_cents == 832
    assert out.ok
    by = {c.customer_id: c for c in out.cases}
    assert by["c-00"].state == "pending" and by["c-00"].exposure_cents == 4992 and by["c-00"].required_level == 2
    assert by["c-01"].state == "approved"
    assert progress.issued == 1 and [c.customer_id for c in progress.waiting] == ["c-00"]
    assert len(polar.refunds) == 1


def test_exposure_is_respected_when_a_crashed_batch_is_resumed(db, db_url, polar):
    seed_customers(db, polar, n=2, instances_each=2)
    seed_exposure(db)

    async def crash():
        async with World(db_url, polar) as w:
            await w.service.open(CheckRequest("i-00-x", ["2026-09"], "U1"))
            batch, _ = await w.remediation.propose("duplicate_charge", "2026-10", "U_LEAD", "C1")

            async def dies(*a, **kw):
                raise ConnectionError("the replica died after the approval committed")
            w.remediation._open_all = dies
            try:
                await w.remediation.approve(batch["id"], "U1")
            except ConnectionError:
                pass
            return batch["id"]

    async def restart(batch_id):
        async with World(db_url, polar) as w:
            assert await w.remediation.resume() == [batch_id]
            await w.issuer.drain(30)
            return await w.batches.cases(batch_id)

    batch_id = asyncio.run(crash())
    cases = {c.customer_id: c for c in asyncio.run(restart(batch_id))}
    assert cases["c-00"].state == "pending" and cases["c-00"].required_level == 2
    assert cases["c-01"].state == "issued" and cases["c-01"].decided_by == "U1"
    assert len(polar.refunds) == 1


def test_a_waiting_batch_case_is_decided_on_its_own_with_its_exposure(db, db_url, polar):
    """The batch case left pending for exposure cannot then be approved by the batch's approver:
    it needs level 2 now."""
    seed_customers(db, polar, n=1, instances_each=2)
    seed_exposure(db)

    async def go():
        async with World(db_url, polar) as w:
            await w.service.open(CheckRequest("i-00-x", ["2026-09"], "U1"))
            batch, _ = await w.remediation.propose("duplicate_charge", "2026-10", "U_LEAD", "C1")
            out = await w.remediation.approve(batch["id"], "U1")
            case = out.cases[0]
            again = await w.service.approve(case.id, "U1")
            lead = await w.service.approve(case.id, "U_LEAD")
            await w.issuer.drain(30)
            return again, lead

    again, lead = asyncio.run(go())
    assert again.status == "refused" and again.needed_level == 2
    assert lead.ok
    assert rows(db_url, "SELECT count(*) FROM billing_corrections")[0][0] == 1
