"""Attacks on the evidence of cases (one instance or several, issue 16) when an instance moves to
another org: the fingerprint is read with the instance's org's throttle row, so a recheck must
compare with the orgs the new check read, and the case must keep the org it was rechecked in.
Before the fix, every approval of such a case raised StaleEvidence: the case was stuck for good."""
import asyncio

from services.cases import CheckRequest

from .seed import throttle
from .test_attack3_batch_races import double_held, refunded_by_customer
from .test_remediation_batch import World, seed_customers


def test_a_case_whose_instance_moved_org_is_checked_again_then_decidable(db, db_url, polar):
    seed_customers(db, polar, n=1, instances_each=2)
    throttle(db, "o-00", None, None, None)  # the old org has a throttle row, the new one none

    async def go():
        async with World(db_url, polar) as w:
            one = await w.service.open(CheckRequest("i-00-1", ["2026-10"], "U1"))
            cust = (await w.service.open_customer("c-00", CheckRequest("", ["2026-10"], "U1")))[0]
            db.execute("UPDATE instances SET org_id = 'o-99'")  # both instances moved to another org
            first = await w.service.approve(one.case.id, "U_LEAD")
            second = await w.service.approve(one.case.id, "U_LEAD")
            # the instance case's refund lands first: an issued case's pieces are in the customer
            # case's evidence, so issuing it between the customer case's two approvals would (rightly)
            # change that evidence once more; this test is about the org move alone
            await w.issuer.drain(30)
            multi_first = await w.service.approve(cust.case.id, "U_LEAD")
            multi_second = await w.service.approve(cust.case.id, "U_LEAD")
            await w.issuer.drain(30)
            return one, cust, first, second, multi_first, multi_second, await w.service.store.get(one.case.id)

    one, cust, first, second, multi_first, multi_second, final = asyncio.run(go())
    assert one.case.instance_id == "i-00-1" and cust.case.instance_id is None
    assert first.status == "changed" and first.case.org_id == "o-99"
    assert second.ok
    assert multi_first.status == "changed" and multi_second.ok
    assert final.state == "issued"
    assert refunded_by_customer(polar) == {"c-00": 208 + 208 + 399}
    assert double_held(db_url) == []


def test_a_batch_case_whose_instance_moves_org_before_issuing_is_checked_again(db, db_url, polar):
    seed_customers(db, polar, n=2, instances_each=1)
    throttle(db, "o-01", None, None, None)

    async def go():
        async with World(db_url, polar) as w:
            batch, _ = await w.remediation.propose("duplicate_charge", "2026-10", "U1", "C1")
            real = w.issuer.submit
            held = []

            async def later(case_id):
                held.append(case_id)
            w.issuer.submit = later
            out = await w.remediation.approve(batch["id"], "U1")
            db.execute("UPDATE instances SET org_id = 'o-77' WHERE instance_id = 'i-01-0'")
            w.issuer.submit = real
            for case_id in held:
                await w.issuer.issue(case_id)
            moved = next(c for c in out.cases if c.customer_id == "c-01")
            now = await w.service.store.get(moved.id)
            again = await w.service.approve(moved.id, "U1")
            await w.issuer.drain(30)
            return now, again, await w.remediation.progress(batch["id"])

    now, again, progress = asyncio.run(go())
    assert now.state == "pending" and now.credit_cents == 208  # checked again before money moved
    assert again.ok and progress.issued == 2
    assert refunded_by_customer(polar) == {"c-00": 208, "c-01": 208}
