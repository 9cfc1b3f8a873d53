"""Attacks on the evidence fingerprint (SPEC 2.2: "At approval, and again just before any money
moves, the bot verifies ... that the database evidence the case was built on is unchanged"). The
Issuer verifies only when the case is `approved` and its outbox is empty, so two ways to money skip
the last look: a worker killed after start_issuing, and a retry of a failed case."""
import asyncio

from .test_issuing import World, orders, seed


def run(coro):
    return asyncio.run(coro)


def test_a_worker_killed_after_start_issuing_does_not_skip_the_last_look(db, db_url, polar):
    """The worker verifies the evidence, moves the case to `issuing`, and is killed before it writes
    the intent. The duplicate record #4 is then removed from the billing records (the control plane
    corrected it), which lowers October's credit. The sweeper resumes the `issuing` case: it skips
    verify_before_money (only done from `approved`) and refunds the stale 10.28."""
    seed(db)
    orders(polar)

    async def go():
        async with World(db_url, polar) as w:
            case = await w.approved_case(periods=("2026-10",))
            assert await w.service.verify_before_money(case) is None
            claimed = await w.service.start_issuing(case)
            assert claimed.state == "issuing"
            # killed here; meanwhile the evidence changes
            db.execute("DELETE FROM billing_records WHERE id = 4")
            return await w.issuer.issue(case.id)

    after = run(go())
    assert polar.refunds == [], (
        f"refunded {[r['amount'] for r in polar.refunds]} cents on evidence that changed; case {after['state']}")


def test_a_retry_after_the_evidence_changed_does_not_pay_the_old_amount(db, db_url, polar):
    """A case over September and October: September's refund succeeds, October's is reported failed.
    The duplicate record #4 (the bulk of October's credit) is then removed. The approver presses
    Retry: CaseService.retry does not verify the evidence, and the Issuer skips the last look
    because the outbox is not empty, so October's old 10.28 is refunded."""
    seed(db)
    orders(polar)

    async def go():
        async with World(db_url, polar) as w:
            case = await w.approved_case()
            polar.queue_refund_statuses("succeeded", "failed")
            failed = await w.issuer.issue(case.id)
            assert failed["state"] == "failed", failed
            db.execute("DELETE FROM billing_records WHERE id = 4")
            out = await w.service.retry(case.id, "U_LEAD", failure=failed["failures"])
            after = await w.issuer.issue(case.id) if out.ok else None
            return out, after

    out, after = run(go())
    new = [r["amount"] for r in polar.refunds[2:]]
    assert new == [], f"retry ({out.status}) refunded {new} cents computed on evidence that has since changed"
