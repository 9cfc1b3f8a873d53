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


def test_a_heartbeat_of_a_running_instance_does_not_block_approval(db, db_url, polar):
    """The fingerprint hashes the whole instance row (`row(i.*)`), last_heartbeat included. A running
    instance heartbeats all the time, so between the check and the approver's click the row has
    changed: the approval is refused as "the evidence changed", the case is checked again with the
    very same amount, and the next click meets the next heartbeat. As long as heartbeats come faster
    than a person clicks, a running instance's case can never be approved. (Here the instance's last
    heartbeat was already weeks after the checked October: no window of the period moves.)"""
    from services.cases import CheckRequest

    from .seed import instance, record
    instance(db, "i-run1", tier="gpu", heartbeat="2026-11-30 12:00")
    record(db, 1, "i-run1", "2026-10-05 08:00", "2026-10-05 10:00", "4.16")
    record(db, 2, "i-run1", "2026-10-05 08:00", "2026-10-05 10:00", "4.16")
    orders(polar)

    async def go():
        async with World(db_url, polar) as w:
            opened = await w.service.open(CheckRequest("i-run1", ["2026-10"], "U1", "T-1"))
            db.execute("UPDATE instances SET last_heartbeat = now() WHERE instance_id = 'i-run1'")
            return opened.case, await w.service.approve(opened.case.id, "U_LEAD")

    before, out = run(go())
    assert before.credit_cents > 0
    assert out.ok, (f"approval refused as {out.status!r}: {out.reason} "
                    f"(was {before.credit_cents} cents, now {out.case.credit_cents} cents)")


def test_a_new_record_in_the_current_month_does_not_block_approval_of_october(db, db_url, polar):
    """The fingerprint hashes every billing record of the instance, whatever its period. A running
    instance gets a new record each billing interval, in the current month (December here), with a
    higher id than October's, so it can change nothing in October (a record is duplicate time only
    where lower ids cover it). Still the approval of the October case is refused as "changed", with
    the same amount, and the same happens to the Issuer's last look before money moves."""
    from services.cases import CheckRequest

    from .seed import instance, record
    instance(db, "i-run1", tier="gpu", heartbeat="2026-11-30 12:00")
    record(db, 1, "i-run1", "2026-10-05 08:00", "2026-10-05 10:00", "4.16")
    record(db, 2, "i-run1", "2026-10-05 08:00", "2026-10-05 10:00", "4.16")
    orders(polar)

    async def go():
        async with World(db_url, polar) as w:
            opened = await w.service.open(CheckRequest("i-run1", ["2026-10"], "U1", "T-1"))
            record(db, 3, "i-run1", "2026-12-01 08:00", "2026-12-01 09:00", "2.08")
            return opened.case, await w.service.approve(opened.case.id, "U_LEAD")

    before, out = run(go())
    assert out.ok, (f"approval refused as {out.status!r} "
                    f"(was {before.credit_cents} cents, now {out.case.credit_cents} cents)")
