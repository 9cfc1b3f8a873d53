"""Attacks on re-checks that send an approved case back to pending (services/store.py replace_evidence)."""
import asyncio

from services.cases import CheckRequest

from .test_issuing import World, orders, seed


def run(coro):
    return asyncio.run(coro)


def test_a_case_the_issuer_rechecked_is_reminded_again_until_someone_decides(db, db_url, polar):
    """SPEC 3: leads are re-pinged on an interval until someone decides. An agent without authority
    opens a case (reminders scheduled), a lead approves it (next_remind_at cleared), and the evidence
    changes before the worker moves money: verify_before_money re-checks it and it is `pending`
    again, waiting for a new decision. replace_evidence never sets next_remind_at, so it stays NULL:
    claim_due_reminders never picks the case and nobody is pinged again."""
    seed(db)
    orders(polar)

    async def go():
        async with World(db_url, polar) as w:
            opened = await w.service.open(CheckRequest("i-7f3a", ["2026-10"], "U_AGENT", "T-1"))
            assert opened.case.next_remind_at is not None  # the agent cannot decide: leads are pinged
            out = await w.service.approve(opened.case.id, "U_LEAD")
            assert out.ok
            db.execute("DELETE FROM billing_records WHERE id = 4")
            await w.issuer.issue(opened.case.id)
            after = await w.cases.get(opened.case.id)
            return after

    after = run(go())
    assert after.state == "pending" and after.credit_cents < 1028, (after.state, after.credit_cents)
    assert after.next_remind_at is not None, (
        f"case {after.id} went back to pending at {after.credit_cents} cents after the evidence changed, "
        "but next_remind_at is NULL: nobody is ever re-pinged to decide it")
