"""Attacks on refund outcomes (SPEC 4): late webhooks, rejecting a failed case while money is still
in flight, two periods invoiced by one order. Each test drives the real CaseService and Issuer
against our Polar server, as tests/test_issuing.py does, and checks the money invariants:
never more money to a customer than the case's credit, no billed second credited twice, exactly one
billing_corrections row per case whose money moved."""
import asyncio
import json

import psycopg

from services.cases import CheckRequest
from services.polar_webhooks import parse

from .test_issuing import World, corrections, orders, seed


def run(coro):
    return asyncio.run(coro)


def refund_event(msg):
    return parse(json.loads(msg.body))


def invoice_credit_cents(db_url, case_id):
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT coalesce(sum(amount_cents), 0) FROM billing_bot.issuances"
                           " WHERE case_id = %s AND method = 'invoice_credit' AND state = 'confirmed'",
                           (case_id,)).fetchone()
    return int(row[0])


def issuances(db_url, case_id):
    with psycopg.connect(db_url) as conn:
        conn.row_factory = psycopg.rows.dict_row
        return conn.execute("SELECT * FROM billing_bot.issuances WHERE case_id = %s ORDER BY id",
                            (case_id,)).fetchall()


def succeeded_refunds(polar, case_id):
    return sum(r["amount"] for r in polar.refunds
               if r["status"] == "succeeded" and (r.get("metadata") or {}).get("case_id") == str(case_id))


def test_a_late_webhook_of_an_old_failed_refund_does_not_take_over_the_retried_refund(db, db_url, polar):
    """Refund R1 is created pending; Polar fails it; the bot's first delivery of that webhook is lost
    (a deploy), so the sweeper reads the failure back and the case fails. The approver retries: a new
    refund R2, pending. Then Polar's retry of R1's `refund.updated failed` arrives. The outbox looks
    the refund up by (case, order) when the id does not match, so R1's stale event overwrites the
    intent that now tracks R2: the case fails although R2 is still in flight. The approver switches
    to invoice credit (the failure offers it) and the full amount goes out as usage events; then R2
    succeeds and is recorded as well: the customer gets the credit twice."""
    seed(db)
    orders(polar)

    async def go():
        async with World(db_url, polar) as w:
            case = await w.approved_case(periods=("2026-10",))
            cid = case["id"]
            polar.queue_refund_statuses("pending", "pending")
            first = await w.issuer.issue(cid)
            assert first["state"] == "issuing"
            r1 = polar.refunds[0]["id"]
            polar.settle_refund(r1, "failed")
            r1_failed = polar.messages("refund.updated")[-1]  # its delivery fails; Polar retries later
            w.issuer.poll_pending_after_s = 0  # the sweeper reads the outcome back
            failed = await w.issuer.issue(cid)
            assert failed["state"] == "failed", failed
            w.issuer.poll_pending_after_s = 600
            retried = await w.service.retry(cid, "U_LEAD", failure=failed["failures"])
            assert retried.ok, retried
            again = await w.issuer.issue(cid)
            assert again["state"] == "issuing"  # R2 pending
            r2 = polar.refunds[1]["id"]
            assert r2 != r1

            # Polar's retry of R1's old event arrives now
            await w.issuer.on_polar_event(refund_event(r1_failed), "late-delivery-of-r1")
            await w.issuer.drain(10)
            tracked = [i for i in issuances(db_url, cid) if i["method"] == "refund"]
            now = await w.service.store.get(cid)
            state_after_late_event = (now.state, [(i["polar_ref"], i["state"]) for i in tracked])

            # what an approver then does with the failure in front of them
            if now.state == "failed":
                switched = await w.service.retry(cid, "U_LEAD", failure=now.failures, switch=True)
                assert switched.ok, switched
                await w.issuer.issue(cid)
            polar.settle_refund(r2, "succeeded")
            await w.issuer.on_polar_event(refund_event(polar.messages("refund.updated")[-1]), "r2-succeeded")
            await w.issuer.drain(10)
            return cid, r2, state_after_late_event

    cid, r2, state_after_late_event = run(go())
    paid = succeeded_refunds(polar, cid) + invoice_credit_cents(db_url, cid)
    assert paid <= 1028, f"the customer got {paid} cents for a 1028-cent case"
    assert state_after_late_event == ("issuing", [(r2, "pending")]), state_after_late_event


def test_a_failed_case_with_a_refund_still_pending_cannot_be_rejected(db, db_url, polar):
    """A case over two periods: September's refund is created pending, October's comes back failed,
    so the case fails. Nothing is `confirmed` yet, so Reject is allowed (moved_cents counts confirmed
    refunds only) and the case's pieces are released. September's refund then succeeds: money moved
    on a rejected case, with no billing_corrections row, and a new check credits the same September
    time again."""
    seed(db)
    orders(polar)

    async def go():
        async with World(db_url, polar) as w:
            case = await w.approved_case()  # September 8 cents, October 1028 cents
            cid = case["id"]
            polar.queue_refund_statuses("pending", "failed")
            failed = await w.issuer.issue(cid)
            assert failed["state"] == "failed", failed
            sept = next(r for r in polar.refunds if r["metadata"]["period"] == "2026-09")
            assert sept["status"] == "pending"
            rejected = await w.service.reject(cid, "U_LEAD", "customer asked to cancel")

            polar.settle_refund(sept["id"], "succeeded")
            await w.issuer.on_polar_event(refund_event(polar.messages("refund.updated")[-1]), "sept-succeeded")
            await w.issuer.drain(10)
            final = await w.service.store.get(cid)
            reopened = await w.service.open(CheckRequest("i-7f3a", ["2026-09"], "U1", "T-2"))
            return cid, rejected, final, reopened

    cid, rejected, final, reopened = run(go())
    moved = succeeded_refunds(polar, cid)
    assert moved == 8
    # money moved on this case: it must not end rejected with no record of it
    assert final.state != "rejected", (
        f"case ended {final.state} (reject {'allowed' if rejected.ok else 'refused'}) while Polar refunded {moved} cents;"
        f" billing_corrections rows: {len(corrections(db_url))}; a new check of September: {reopened.status},"
        f" {reopened.case.credit_cents if reopened.case else None} cents")
    assert len(corrections(db_url)) <= 1
    # the September pieces are still held: a second check shows the case or credits nothing more
    assert not (reopened.status == "done" and reopened.case.credit_cents > 0), (
        f"a new case #{reopened.case.id} credits {reopened.case.credit_cents} cents of time case {cid} refunded")


def test_two_periods_invoiced_by_one_order_are_both_refunded(db, db_url, polar):
    """September was never invoiced on its own (no order created in October), so SPEC 4's rule
    (earliest subscription_cycle order on or after the first of the next month) names November's
    order for both September and October. The outbox is unique per (case, order): October's intent
    returns September's 8-cent row, the read-back finds September's refund and counts it as
    October's, and the case ends issued with 8 cents paid and 1028 cents called "not refundable on
    the order", though the order could take all of it."""
    seed(db)
    orders(polar, sept=None)

    async def go():
        async with World(db_url, polar) as w:
            case = await w.approved_case()
            return await w.issuer.issue(case["id"])

    done = run(go())
    assert [r["amount"] for r in polar.refunds] != [8], "only September's 8 cents were refunded"
    assert done["issued_cents"] == 1036 and done["remainder_cents"] == 0, (done["issued_cents"], done["remainder_cents"])


def case_events(db_url, case_id):
    with psycopg.connect(db_url) as conn:
        return [(a, d) for a, d in conn.execute(
            "SELECT action, detail FROM billing_bot.case_events WHERE case_id = %s ORDER BY id", (case_id,)).fetchall()]


def test_refund_created_pending_delivered_after_refund_updated_failed_does_not_revive_the_refund(db, db_url, polar):
    """Out of order: Polar's `refund.updated` (failed) is delivered before `refund.created`
    (pending) of the same refund. The outbox only protects `confirmed` from going back, so the stale
    `pending` turns the failed refund back into a pending one. The approver's Retry then shows
    "refund pending" and moves nothing for 10 minutes (until the read-back), and the case claims a
    pending refund that Polar already reported failed. RefundUpdate's own docstring says to order two
    reports of one refund by `modified_at`; on_polar_event does not."""
    seed(db)
    orders(polar)

    async def go():
        async with World(db_url, polar) as w:
            case = await w.approved_case(periods=("2026-10",))
            cid = case["id"]
            polar.queue_refund_statuses("pending", "succeeded")
            assert (await w.issuer.issue(cid))["state"] == "issuing"
            r1 = polar.refunds[0]["id"]
            created = polar.messages("refund.created")[-1]
            polar.settle_refund(r1, "failed")
            updated = polar.messages("refund.updated")[-1]
            await w.issuer.on_polar_event(refund_event(updated), "updated-failed")
            await w.issuer.drain(10)
            failed = await w.service.store.get(cid)
            assert failed.state == "failed", failed
            await w.issuer.on_polar_event(refund_event(created), "created-pending-late")
            await w.issuer.drain(10)
            retried = await w.service.retry(cid, "U_LEAD", failure=failed.failures)
            assert retried.ok, retried
            after = await w.issuer.issue(cid)
            return after, [(i["polar_ref"], i["state"], i["refund_status"]) for i in issuances(db_url, cid)]

    after, rows = run(go())
    assert rows[0][1] != "pending", f"the failed refund is tracked as pending again: {rows}"
    assert after["state"] == "issued" and len(polar.refunds) == 2, (after["state"], rows)


def test_a_succeeded_refund_that_polar_reverts_is_noticed(db, db_url, polar):
    """Polar reverts a succeeded refund (refund.updated failed; services/polar_webhooks.py says this
    happens and Polar undoes its ledger). The case stays issued with its billing_corrections row
    claiming the money, the customer was emailed about it, and nothing is recorded or told: the
    outbox ignores any news about a confirmed refund and on_polar_event returns silently."""
    seed(db)
    orders(polar)

    async def go():
        async with World(db_url, polar) as w:
            case = await w.approved_case(periods=("2026-10",))
            cid = case["id"]
            done = await w.issuer.issue(cid)
            assert done["state"] == "issued"
            before = case_events(db_url, cid)
            polar.settle_refund(polar.refunds[0]["id"], "failed")  # Polar reverts it
            await w.issuer.on_polar_event(refund_event(polar.messages("refund.updated")[-1]), "reverted")
            await w.issuer.drain(10)
            return cid, before, case_events(db_url, cid), w.rec

    cid, before, after, rec = run(go())
    new = after[len(before):]
    assert new or rec.failed_calls, (
        "Polar reverted the refund of an issued case; the bot recorded nothing and told nobody "
        f"(billing_corrections still claims {corrections(db_url)[0][3]})")


def test_a_remainder_the_order_could_not_take_is_offered_as_invoice_credit(db, db_url, polar):
    """SPEC 4: "A remainder that the order's refundable_amount left unpaid is offered as invoice
    credit to someone whose authority covers it." The Case has `parent_case_id` for a remainder's
    case, but nothing ever creates one: the case ends issued with remainder_cents and a thread note
    that "a lead decides", with no case, button or action that can issue it."""
    seed(db)
    orders(polar, oct_=1500, oct_refunded=1000)  # 500 cents left to refund on October's order

    async def go():
        async with World(db_url, polar) as w:
            case = await w.approved_case(periods=("2026-10",))
            return await w.issuer.issue(case["id"])

    done = run(go())
    assert done["remainder_cents"] == 528
    with psycopg.connect(db_url) as conn:
        offers = conn.execute("SELECT id, state, credit_cents, method FROM billing_bot.cases WHERE parent_case_id = %s",
                              (done["id"],)).fetchall()
    assert offers, "the 528-cent remainder is not offered anywhere: no remainder case, nothing to approve"


def test_a_failed_invoice_credit_whose_events_reached_polar_cannot_be_rejected(db, db_url, polar):
    """Invoice credit: Polar stores the compensating events but every answer is lost (commit then
    timeout), so the case fails with its intent unknown (attempts > 0, not confirmed). Reject only
    looks at *confirmed* money (CaseTx.moved_cents), so it is allowed: the case is rejected and its
    pieces released while its events are already on the customer's next invoice, and a new check
    credits the same time again."""
    seed(db)
    orders(polar)

    async def go():
        async with World(db_url, polar) as w:
            case = await w.approved_case(periods=("2026-10",), method="invoice_credit")
            polar.fail("POST", "/v1/events/ingest", kind="drop_after", times=20)
            failed = await w.issuer.issue(case.id)
            assert failed["state"] == "failed", failed
            assert polar.events, "Polar stored the events"
            rejected = await w.service.reject(case.id, "U_LEAD", "looks wrong")
            reopened = await w.service.open(CheckRequest("i-7f3a", ["2026-10"], "U1", "T-2"))
            return rejected, reopened

    rejected, reopened = run(go())
    assert not rejected.ok, "rejected a case whose credit may already be on the next invoice"
    assert not (reopened.status == "done" and reopened.case.credit_cents > 0), \
        f"a new case credits {reopened.case.credit_cents} cents of the same October time"


def test_an_order_with_nothing_left_to_refund_fails_the_case_instead_of_issuing_zero(db, db_url, polar):
    """October's order is already fully refunded (refundable_amount 0; Polar would answer 403). The
    Issuer caps each refund at the listed refundable_amount *before* posting, so it never posts,
    never sees the 403, and ends the case `issued` with 0 cents: a billing_corrections row of $0.00,
    "Issued $0.00" in Slack and a letter to the customer, with the whole credit called a remainder
    "left for a lead" that nothing offers. Expected (issue 13): the case fails with a reason a person
    understands (already fully refunded) and offers invoice credit."""
    seed(db)
    orders(polar, oct_=1500, oct_refunded=1500)

    async def go():
        async with World(db_url, polar) as w:
            case = await w.approved_case(periods=("2026-10",))
            return await w.issuer.issue(case["id"]), w.rec

    done, rec = run(go())
    assert polar.refunds == []
    assert not (done["state"] == "issued" and done["issued_cents"] == 0), (
        f"issued 0 cents: corrections {[str(r[3]) for r in corrections(db_url)]}, announced {rec.issued_calls}")
    assert done["state"] == "failed" and rec.failed_calls and rec.failed_calls[0][2] is True


def test_regression_succeeded_before_created_pending_settles_once(db, db_url, polar):
    """Out of order the other way: `refund.updated` (succeeded) arrives before `refund.created`
    (pending), then both are delivered again under new ids. The case is issued once, with one
    billing_corrections row, and the late `pending` does not take the confirmed refund back."""
    seed(db)
    orders(polar)

    async def go():
        async with World(db_url, polar) as w:
            case = await w.approved_case(periods=("2026-10",))
            polar.queue_refund_statuses("pending")
            assert (await w.issuer.issue(case.id))["state"] == "issuing"
            r = polar.refunds[0]["id"]
            created = polar.messages("refund.created")[-1]
            polar.settle_refund(r, "succeeded")
            updated = polar.messages("refund.updated")[-1]
            for n, msg in enumerate([updated, created, updated, created]):
                await w.issuer.on_polar_event(refund_event(msg), f"delivery-{n}")
                await w.issuer.drain(10)
            return await w.service.store.get(case.id), w.rec

    final, rec = run(go())
    assert final.state == "issued" and final.issued_cents == 1028
    assert len(corrections(db_url)) == 1 and len(rec.issued_calls) == 1
    assert [(i["state"], i["refund_status"]) for i in issuances(db_url, final.id)] == [("confirmed", "succeeded")]


def test_regression_the_sweeper_racing_a_live_worker_and_a_cancelled_worker_make_one_refund(db, db_url, polar):
    """A worker is mid-POST (Polar slow) while the sweeper claims the case on another connection,
    then the worker is cancelled mid-call and the sweeper runs again: one refund, one row, and the
    case lock is not left held by any pooled connection."""
    seed(db)
    orders(polar)

    async def go():
        async with World(db_url, polar) as w:
            case = await w.approved_case(periods=("2026-10",))
            polar.server.latency_s = 0.4
            worker = asyncio.create_task(w.issuer.issue(case.id))
            await asyncio.sleep(0.3)
            swept = await w.issuer.sweep_once(older_than_s=0)  # the worker holds the case: nothing done
            await asyncio.sleep(0.5)
            worker.cancel()
            try:
                await worker
            except asyncio.CancelledError:
                pass
            polar.server.latency_s = 0
            await asyncio.sleep(0.5)
            with psycopg.connect(db_url) as conn:
                held = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                                    " AND classid = 7242002 AND objid = %s", (case.id,)).fetchone()[0]
            done = await w.issuer.issue(case.id)
            return swept, held, done

    swept, held, done = run(go())
    assert held == 0
    assert done["state"] == "issued" and len(polar.refunds) == 1 and len(corrections(db_url)) == 1, (
        done["state"], [r["amount"] for r in polar.refunds])
