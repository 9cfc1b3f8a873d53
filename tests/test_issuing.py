"""Issuing exactly once in Polar (SPEC 4), against our Polar server with faults injected."""
import asyncio
import time
from datetime import datetime, timezone

import psycopg
import pytest

from services.cases import CaseService, CheckRequest
from services.config import parse_config
from services.db import Database
from services.investigation import Investigator
from services.issuing import Issuer, invoicing_order
from services.polar import PolarClient
from services.store import CaseStore, Outbox

from .fakes.polar_server import TOKEN
from .seed import instance, record

CONFIG = parse_config({"levels": {1: {"users": ["U1"]}, 2: {"users": ["U_LEAD"]}, 4: {"users": ["U_VP"]}}})


class Recorder:
    def __init__(self):
        self.issued_calls, self.failed_calls, self.rechecks, self.pendings = [], [], [], []
        self.outsides, self.reverts, self.remainders = [], [], []

    async def issued(self, case, refs, remainder):
        self.issued_calls.append((case["id"], refs, remainder))

    async def failed(self, case, reason, offer):
        self.failed_calls.append((case["id"], reason, offer))

    async def rechecked(self, outcome):
        self.rechecks.append(outcome)

    async def pending(self, case, refs):
        self.pendings.append((case["id"], refs))

    async def outside(self, case, amount, reason):
        self.outsides.append((case["id"], amount))

    async def reverted(self, case, refund_id, amount, status):
        self.reverts.append((case["id"], refund_id, amount))

    async def remainder_offered(self, parent, child):
        self.remainders.append((parent["id"], child["id"]))


async def authority(user):
    from handlers.cases import authority_from_levels
    levels = tuple(n for n, lv in CONFIG.levels.items() if user in lv.users)
    return authority_from_levels(CONFIG, user, levels)


def service(db) -> CaseService:
    return CaseService(CaseStore(db), Investigator(CONFIG, db), CONFIG, authority)


def seed(db):
    instance(db, "i-7f3a", customer="c-acme", tier="small", heartbeat="2026-10-05 09:00")
    record(db, 1, "i-7f3a", "2026-09-05 08:00", "2026-09-05 09:00", "0.083", tier="small", rate="0.083")
    record(db, 2, "i-7f3a", "2026-09-05 08:00", "2026-09-05 09:00", "0.083", tier="small", rate="0.083")
    record(db, 3, "i-7f3a", "2026-10-05 08:00", "2026-10-05 10:00", "4.16")
    record(db, 4, "i-7f3a", "2026-10-05 08:00", "2026-10-05 10:00", "4.16")
    record(db, 5, "i-7f3a", "2026-10-05 10:00", "2026-10-05 11:00", "2.08")


def orders(polar, *, sept=5000, oct_=5000, oct_refunded=0):
    polar.add_customer("c-acme", email="ada@example.com", name="Ada Lovelace")
    polar.add_order("c-acme", datetime(2026, 9, 1, tzinfo=timezone.utc), 5000)  # invoices August
    if sept is not None:
        polar.add_order("c-acme", datetime(2026, 10, 1, 0, 5, tzinfo=timezone.utc), sept)
    if oct_ is not None:
        polar.add_order("c-acme", datetime(2026, 11, 1, 0, 5, tzinfo=timezone.utc), oct_, refunded=oct_refunded)
        polar.add_order("c-acme", datetime(2026, 11, 2, tzinfo=timezone.utc), 999, billing_reason="purchase")


class World:
    def __init__(self, db_url, polar):
        self.db_url, self.polar = db_url, polar

    async def __aenter__(self):
        self.db = await Database.connect(self.db_url)
        self.service = service(self.db)
        self.cases = self.service.store
        await self.cases.migrate()
        self.client = PolarClient(self.polar.url, TOKEN, backoff=0.05)
        self.rec = Recorder()
        self.issuer = Issuer(self.service, self.client, CONFIG, self.rec, lookup_delay_s=0.05)
        return self

    async def __aexit__(self, *exc):
        await self.client.close()
        await self.db.close()

    async def approved_case(self, periods=("2026-09", "2026-10"), method="refund", kinds=None):
        opened = await self.service.open(CheckRequest("i-7f3a", list(periods), "U1", "T-1"))
        out = await self.service.approve(opened.case.id, "U_LEAD", method)
        assert out.ok, out
        return out.case


def corrections(db_url):
    with psycopg.connect(db_url) as conn:
        return conn.execute("SELECT customer_id, ticket_id, issue_type, credit_amount, resolved_by, notes"
                            " FROM billing_corrections").fetchall()


def run(coro):
    return asyncio.run(coro)


def approve_and_issue_october(db_url, polar):
    """(issued case row, recorder): a case on October alone, approved, then issued once."""
    async def go():
        async with World(db_url, polar) as w:
            case = await w.approved_case(periods=("2026-10",))
            return await w.issuer.issue(case["id"]), w.rec
    return run(go())


def test_refund_across_two_periods(db, db_url, polar):
    seed(db)
    orders(polar)

    async def go():
        async with World(db_url, polar) as w:
            case = await w.approved_case()
            assert case["report"]["credit_by_period"] == {"2026-09": 8, "2026-10": 1028}
            done = await w.issuer.issue(case["id"])
            return case, done, w.rec
    case, done, rec = run(go())
    assert done["state"] == "issued" and done["issued_cents"] == 1036
    by_order = {r["order_id"]: r for r in polar.refunds}
    sep_order = next(o for o in polar.orders if o["created_at"].startswith("2026-10-01"))
    oct_order = next(o for o in polar.orders if o["created_at"].startswith("2026-11-01"))
    assert by_order[sep_order["id"]]["amount"] == 8 and by_order[oct_order["id"]]["amount"] == 1028
    r = by_order[oct_order["id"]]
    assert r["reason"] == "service_disruption"
    assert r["metadata"] == {"case_id": str(case["id"]), "ticket_id": "T-1", "instance_id": "i-7f3a", "period": "2026-10"}
    rows = corrections(db_url)
    assert len(rows) == 1
    customer, ticket, issue_type, amount, by, notes = rows[0]
    assert (customer, ticket, issue_type, str(amount), by) == ("c-acme", "T-1", "duplicate_charge", "10.36", "U_LEAD")
    assert "root cause" in notes and oct_order["id"] not in notes  # notes carry refund ids, not order ids
    assert rec.issued_calls == [(case["id"], [by_order[sep_order["id"]]["id"], r["id"]], 0)]


def test_refund_is_capped_at_the_refundable_amount_and_the_rest_stays_on_the_case(db, db_url, polar):
    seed(db)
    orders(polar, oct_=1500, oct_refunded=1000)  # 500 cents left to refund on October's order
    done, rec = approve_and_issue_october(db_url, polar)
    assert [r["amount"] for r in polar.refunds] == [500]
    assert done["issued_cents"] == 500 and done["remainder_cents"] == 528
    assert rec.issued_calls[0][2] == 528
    assert "not refundable on the order, left for a lead" in corrections(db_url)[0][5]


def test_a_period_not_invoiced_yet_fails_and_offers_invoice_credit(db, db_url, polar):
    seed(db)
    orders(polar, oct_=None)
    done, rec = approve_and_issue_october(db_url, polar)
    assert done["state"] == "failed" and "2026-10 not invoiced yet" in done["reason"]
    assert rec.failed_calls[0][2] is True and polar.refunds == []
    assert corrections(db_url) == []


def test_invoice_credit_events_are_idempotent(db, db_url, polar):
    seed(db)
    orders(polar)

    async def go():
        async with World(db_url, polar) as w:
            case = await w.approved_case(periods=("2026-10",), method="invoice_credit")
            done = await w.issuer.issue(case["id"])
            # a retry of the whole ingest (say, after a lost response) is harmless
            events = await w.issuer._compensating_events(done, f"billing-bot-case-{case['id']}", done["issued_cents"])
            again = await w.client.ingest_events(events)
            return done, events, again
    done, events, again = run(go())
    assert done["state"] == "issued" and done["issued_cents"] == 1028
    assert again == {"inserted": 0, "duplicates": len(events)}
    tiers = sorted((e["metadata"]["tier"], e["metadata"]["hours"]) for e in events)
    # duplicate 2 h, stuck 1.5 h (two pieces), wrong tier 1.5 h: negative on gpu, positive on small
    assert ("small", 1.5) in tiers and ("gpu", -1.5) in tiers and ("gpu", -2.0) in tiers
    assert all(e["external_id"].startswith(f"billing-bot-case-{done['id']}-") for e in events)
    assert polar.refunds == []


def test_429_with_retry_after_is_honoured(db, db_url, polar):
    seed(db)
    orders(polar)
    polar.fail("GET", "/v1/orders/", status=429, retry_after="1")

    async def go():
        async with World(db_url, polar) as w:
            case = await w.approved_case(periods=("2026-10",))
            t0 = time.perf_counter()
            done = await w.issuer.issue(case["id"])
            return done, time.perf_counter() - t0
    done, elapsed = run(go())
    assert done["state"] == "issued" and elapsed >= 1.0
    assert len(polar.refunds) == 1


def test_500_then_success_gives_one_refund(db, db_url, polar):
    seed(db)
    orders(polar)
    polar.fail("POST", "/v1/refunds/", status=500)
    done, _ = approve_and_issue_october(db_url, polar)
    assert done["state"] == "issued" and len(polar.refunds) == 1
    posts = [r for r in polar.server.requests if r.method == "POST" and r.path == "/v1/refunds/"]
    gets = [r for r in polar.server.requests if r.method == "GET" and r.path == "/v1/refunds/"]
    # read back before the first POST (a refund of the case Polar holds counts as made) and after
    # the 500 (found nothing, so the second POST goes out)
    assert len(posts) == 2 and len(gets) == 2


def test_refund_committed_but_response_lost_is_not_sent_again(db, db_url, polar):
    seed(db)
    orders(polar)
    polar.fail("POST", "/v1/refunds/", kind="drop_after")
    done, _ = approve_and_issue_october(db_url, polar)
    assert done["state"] == "issued" and len(polar.refunds) == 1
    posts = [r for r in polar.server.requests if r.method == "POST" and r.path == "/v1/refunds/"]
    assert len(posts) == 1
    assert done["polar_reference"] == polar.refunds[0]["id"]


@pytest.mark.parametrize("refund_already_made", [False, True])
def test_killed_between_intent_and_call_resumes_with_one_refund(db, db_url, polar, refund_already_made):
    seed(db)
    orders(polar)

    async def go():
        async with World(db_url, polar) as w:
            case = await w.approved_case(periods=("2026-10",))
            # the first process claimed the case and wrote its intent, then died
            await w.cases.move(case["id"], "start_issuing", "billing-bot")
            order = next(o for o in polar.orders if o["created_at"].startswith("2026-11-01"))
            await Outbox(w.cases).intend(case["id"], "refund", order["id"], "2026-10", 1028)
            if refund_already_made:  # ... or died after Polar made the refund, before recording it
                await w.client.create_refund({"order_id": order["id"], "amount": 1028, "reason": "service_disruption",
                                              "metadata": {"case_id": str(case["id"])}})
        async with World(db_url, polar) as w2:  # a new process starts
            resumed = await w2.issuer.resume_unfinished()
            return case, resumed, await w2.cases.get(case["id"])
    case, resumed, final = run(go())
    assert resumed == [case["id"]] and final["state"] == "issued"
    assert len(polar.refunds) == 1 and polar.refunds[0]["amount"] == 1028
    assert len(corrections(db_url)) == 1


def test_two_workers_at_once_make_one_refund(db, db_url, polar):
    seed(db)
    orders(polar)

    async def go():
        async with World(db_url, polar) as a, World(db_url, polar) as b:
            case = await a.approved_case(periods=("2026-10",))
            await asyncio.gather(a.issuer.issue(case["id"]), a.issuer.issue(case["id"]), b.issuer.issue(case["id"]))
            return await a.cases.get(case["id"])
    final = run(go())
    assert final["state"] == "issued" and len(polar.refunds) == 1 and len(corrections(db_url)) == 1


def test_invoicing_order_rule():
    o = lambda created, reason="subscription_cycle": {"created_at": created, "billing_reason": reason, "id": created}  # noqa: E731
    orders_ = [o("2026-11-03T00:00:00Z"), o("2026-11-01T00:00:00Z", "purchase"), o("2026-11-02T00:00:00Z"),
               o("2026-10-31T23:59:59Z")]
    assert invoicing_order(orders_, "2026-10")["id"] == "2026-11-02T00:00:00Z"
    assert invoicing_order(orders_, "2026-11") is None
    assert invoicing_order([o("2027-01-01T00:00:00Z")], "2026-12")["id"] == "2027-01-01T00:00:00Z"


def test_a_later_check_does_not_credit_what_an_issued_case_covered(db, db_url, polar):
    seed(db)
    orders(polar)

    async def go():
        async with World(db_url, polar) as w:
            case = await w.approved_case(periods=("2026-10",))
            await w.issuer.issue(case["id"])
            again = await Investigator(CONFIG, w.db).check("i-7f3a", ["2026-10"])
            return case, again
    case, again = run(go())
    assert again.result.credit_cents == 0 and again.result.findings == []
    assert again.result.credited_before == [{"case_id": case["id"], "credit_cents": 1028,
                                             "kinds": ["duplicate_charge", "stuck_instance", "wrong_tier"],
                                             "state": "issued",
                                             "text": f"credited before: $10.28 in case {case['id']}"}]


def test_the_remainder_a_capped_refund_left_is_offered_once_as_invoice_credit(db, db_url, polar):
    seed(db)
    orders(polar, oct_=1500, oct_refunded=1000)  # the order can take 500 of 1,028 cents

    async def go():
        async with World(db_url, polar) as w:
            case = await w.approved_case(periods=("2026-10",))
            parent = await w.issuer.issue(case.id)
            child = await w.cases.get(parent.id + 1)
            again = await w.service.offer_remainder(parent)  # a second offer is the same case
            refused = await w.service.approve(child.id, "U_NOBODY")
            out = await w.service.approve(child.id, "U1")
            issued = await w.issuer.issue(child.id)
            return parent, child, again, refused, out, issued
    parent, child, again, refused, out, issued = run(go())
    assert parent.state == "issued" and parent.remainder_cents == 528
    assert child.parent_case_id == parent.id and child.state == "pending" and child.method == "invoice_credit"
    assert child.credit_cents == 528 and again.id == child.id
    assert refused.status == "refused" and refused.needed_level == 1
    assert out.ok and issued.state == "issued" and issued.issued_cents == 528
    assert [r["amount"] for r in polar.refunds] == [500]
    assert sorted(str(r[3]) for r in corrections(db_url)) == ["5.00", "5.28"]
    hours = sum(e["metadata"]["hours"] for e in polar.events if e["metadata"].get("case_id") == str(child.id))
    assert hours < 0  # compensating events on the parent's pieces, scaled to the remainder


def test_no_second_post_while_a_first_may_still_be_in_flight_elsewhere(db, db_url, polar):
    """A worker whose pooled connection died lost its lock while its POST may still be running:
    within the POST's window nobody posts again; after it, the lookup decides, and one refund is made."""
    seed(db)
    orders(polar)

    async def go():
        async with World(db_url, polar) as w:
            case = await w.approved_case(periods=("2026-10",))
            await w.cases.move(case.id, "start_issuing", "billing-bot")
            order = next(o for o in polar.orders if o["created_at"].startswith("2026-11-01"))
            intent = await Outbox(w.cases).intend(case.id, "refund", order["id"], "2026-10", 1028)
            await Outbox(w.cases).attempt(intent["id"])  # the other worker's POST started just now
            w.issuer.in_flight_window_s = 0.5
            early = await w.issuer.issue(case.id)
            posts_early = len([r for r in polar.server.requests if r.method == "POST"])
            await asyncio.sleep(0.6)
            late = await w.issuer.issue(case.id)
            return early, posts_early, late
    early, posts_early, late = run(go())
    assert early.state == "issuing" and posts_early == 0
    assert late.state == "issued" and len(polar.refunds) == 1
