"""Attacks on the floor a re-check keeps (services/cases.py recheck floor_cents, CaseTx.moved_cents)."""
import asyncio

from .test_issuing import World, orders, seed


def run(coro):
    return asyncio.run(coro)


def test_a_refund_polar_never_made_does_not_hold_the_old_amount_after_the_evidence_changed(db, db_url, polar):
    """Every POST of October's 1,028-cent refund gets a 503 (Polar made nothing; the read-backs
    find nothing), so the case fails with its intent `intent`, attempts 3. The control plane then
    removes the duplicate record #4: October is now worth 612 cents. The approver retries; the
    evidence changed, so the case is checked again, but with floor_cents = moved_cents, which counts
    the never-made refund as money that "may have reached the customer": the case keeps 1,028. After
    the POST window the lookup again finds nothing, the Issuer skips the last look (an attempted
    intent is "in flight") and POSTs the stale 1,028 (416 cents more than the evidence supports)."""
    seed(db)
    orders(polar)

    async def go():
        async with World(db_url, polar) as w:
            w.issuer.in_flight_window_s = 0.2
            case = await w.approved_case(periods=("2026-10",))
            polar.fail("POST", "/v1/refunds/", status=503, times=1000)
            failed = await w.issuer.issue(case.id)
            polar.faults.clear()
            db.execute("DELETE FROM billing_records WHERE id = 4")
            fresh = (await w.service.investigator.check("i-7f3a", ["2026-10"], exclude_case=case.id)).as_json()
            await asyncio.sleep(0.3)  # the POSTs have surely ended: the lookup finds no refund
            first = await w.service.retry(case.id, "U_LEAD", failure=failed.failures)
            out = await w.service.approve(case.id, "U_LEAD") if first.status == "changed" else first
            await asyncio.sleep(0.3)
            after = await w.issuer.issue(case.id)
            return failed, fresh["credit_cents"], (first, out), after

    failed, now_cents, (first, out), after = run(go())
    assert failed.state == "failed" and now_cents == 612, (failed.state, now_cents)
    refunded = [r["amount"] for r in polar.refunds]
    assert sum(refunded) <= now_cents, (
        f"refunded {refunded} cents though Polar never made the first refund and the evidence now supports "
        f"{now_cents} cents (retry -> {first.status} at {first.case.credit_cents if first.case else None} cents, approve -> {out.status}, case {after.state} {after.issued_cents})")
