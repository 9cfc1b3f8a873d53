"""Attacks on Outbox.settle / by_refund and Issuer.on_polar_event."""
import asyncio

from services.polar_webhooks import RefundUpdate

from .test_issuing import World, orders, seed


def run(coro):
    return asyncio.run(coro)


def test_a_failed_earlier_attempt_reported_mid_post_does_not_hide_the_refund_that_succeeded(db, db_url, polar):
    """October's first refund POST is made by Polar (R1) but its answer is lost; R1 then fails in
    Polar. The read-back skips failed refunds, so the worker POSTs again. While that POST runs, the
    webhook `refund.updated` R1 failed arrives: by_refund matches the intent (polar_ref NULL, same
    case and order) and Outbox.settle records it `failed` with polar_ref R1. The second POST answers
    R2 succeeded, but settle_refund(intent, R2) is a no-op (`polar_ref IS NULL OR polar_ref = R2`),
    so the intent stays failed: the case fails saying R2 "succeeded: no money moved" and offers the
    other method. Switching to invoice credit then credits 1,028 cents a second time."""
    seed(db)
    orders(polar)
    polar.fail("POST", "/v1/refunds/", kind="drop_after")  # R1 made, its answer lost
    polar.queue_refund_statuses("failed", "succeeded")

    async def go():
        async with World(db_url, polar) as w:
            case = await w.approved_case(periods=("2026-10",))
            real = w.client.create_refund
            calls = []

            async def create_refund(body):
                calls.append(body)
                if len(calls) == 2:  # the webhook of R1's failure arrives while the second POST runs
                    r1 = polar.refunds[0]
                    await w.issuer.on_polar_event(RefundUpdate(
                        event_type="refund.updated", refund_id=r1["id"], order_id=r1["order_id"], status="failed",
                        amount_cents=r1["amount"], tax_amount_cents=0, currency="usd", reason=r1["reason"],
                        case_id=str(case.id), customer_id="c-acme", created_at=r1["created_at"],
                        modified_at=r1["created_at"], dispute_status=None, metadata={"case_id": str(case.id)}),
                        "wh-1")
                return await real(body)
            w.client.create_refund = create_refund
            failed = await w.issuer.issue(case.id)
            out = await w.service.retry(case.id, "U_LEAD", failure=failed.failures, switch=True) \
                if failed.state == "failed" else None
            after = await w.issuer.issue(case.id) if out is not None and out.ok else failed
            return failed, after, w.rec

    failed, after, rec = run(go())
    statuses = [(r["id"][:8], r["status"], r["amount"]) for r in polar.refunds]
    credited = -sum(e["metadata"]["hours"] for e in polar.events) if polar.events else 0
    assert failed.state == "issued" and not (polar.events), (
        f"refunds in Polar {statuses}; the case went {failed.state} ({rec.failed_calls[:1]}); after switching "
        f"method it is {after.state} with {after.issued_cents} cents issued, and {credited:.4f} compensating "
        "hours were sent as invoice credit on top of the refund that succeeded")


def test_a_new_approval_after_a_recheck_issues_instead_of_failing_on_the_old_failure(db, db_url, polar):
    """October's refund is pending. The duplicate record #4 is removed, then Polar reports the
    refund failed: the webhook settles the intent `failed` (failure not yet told) and submits the
    case; nothing is in flight any more, so the Issuer's last look re-checks it (612 cents) and it
    waits for a new decision, the Polar failure untold. The lead approves the new 612 cents: the
    worker's first step (_refunds) finds that old untold failure and fails the case at once with
    "Polar reports the refund ... failed", without trying the amount just approved."""
    from .test_attack_refund_outcomes import refund_event
    seed(db)
    orders(polar)

    async def go():
        async with World(db_url, polar) as w:
            case = await w.approved_case(periods=("2026-10",))
            polar.queue_refund_statuses("pending")
            pending = await w.issuer.issue(case.id)
            assert pending.state == "issuing", pending.state
            db.execute("DELETE FROM billing_records WHERE id = 4")
            polar.settle_refund(polar.refunds[0]["id"], "failed")
            await w.issuer.on_polar_event(refund_event(polar.messages("refund.updated")[-1]), "oct-failed")
            await w.issuer.drain(10)
            rechecked = await w.cases.get(case.id)
            out = await w.service.approve(case.id, "U_LEAD")
            after = await w.issuer.issue(case.id) if out.ok else None
            return rechecked, out, after, w.rec

    rechecked, out, after, rec = run(go())
    assert rechecked.state == "pending" and rechecked.credit_cents == 612, (rechecked.state, rechecked.credit_cents)
    assert out.ok
    assert after.state != "failed", (
        f"the new approval of {rechecked.credit_cents} cents failed at once without a POST "
        f"(refunds posted: {[(r['amount'], r['status']) for r in polar.refunds]}): {rec.failed_calls}")
