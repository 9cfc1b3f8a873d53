"""Attack 4 on the refund intents (services/issuing.py _refunds): an intent written in this run
(the review made its first POST skip the read-back; that was reverted after the last test here
showed a refund Polar holds without an outbox row refunded twice), and the intents a run finds
already written (only a tried one keeps its amount)."""
import asyncio
import time

import psycopg
import pytest

from services import store as store_mod
from services.store import Outbox

from .fakes.http import Response
from .test_issuing import World, corrections, orders, seed


def run(coro):
    return asyncio.run(coro)


def october_order(polar):
    return next(o for o in polar.orders if o["created_at"].startswith("2026-11-01"))


def made(polar):
    return [r for r in polar.refunds if r["status"] in ("succeeded", "pending")]


def test_an_untried_intent_takes_the_amount_the_evidence_supports_after_a_recheck(db, db_url, polar):
    """A worker claimed the case, wrote its intent (1,028 cents on October's order) and died before
    its attempt: attempts 0, so no POST of it was ever sent. The control plane then removes the
    duplicate record #4: October is worth 612 cents. The sweeper resumes the case, the last look
    sees the change and the case waits for a new decision at 612; it is approved. The intent still
    says 1,028 ('a resumed run keeps the amount it meant to refund'), and 1,028 is refunded: 416
    cents more than the case's credit, and the case ends issued with issued_cents > credit_cents."""
    seed(db)
    orders(polar)

    async def go():
        async with World(db_url, polar) as w:
            case = await w.approved_case(periods=("2026-10",))
            await w.cases.move(case.id, "start_issuing", "billing-bot")
            await Outbox(w.cases).intend(case.id, "refund", october_order(polar)["id"], "2026-10", 1028)
            db.execute("DELETE FROM billing_records WHERE id = 4")
            resumed = await w.issuer.issue(case.id)  # the sweeper
            assert resumed.state == "pending" and resumed.credit_cents == 612, (resumed.state, resumed.credit_cents)
            out = await w.service.approve(case.id, "U_LEAD")
            assert out.ok, out
            return await w.issuer.issue(case.id)

    done = run(go())
    refunded = sum(r["amount"] for r in made(polar))
    assert refunded <= 612, f"refunded {refunded} cents on a case now worth 612 (issued {done.issued_cents})"
    assert done.state == "issued" and done.issued_cents == 612


def test_a_429_polar_processed_is_found_by_the_read_back_and_not_posted_again(db, db_url, polar, monkeypatch):
    """Polar makes the refund but answers 429 (a limiter in front of a request already handled).
    The read-back after it finds the refund: no second POST."""
    seed(db)
    orders(polar)
    real = polar.server.handler
    hit = []

    def handle(req):
        resp = real(req)
        if req.method == "POST" and req.path == "/v1/refunds/" and not hit:
            hit.append(resp.status)
            return Response(429, {"error": "TooManyRequests", "detail": "Rate limit exceeded"}, {"Retry-After": "0"})
        return resp

    monkeypatch.setattr(polar.server, "handler", handle)

    async def go():
        async with World(db_url, polar) as w:
            case = await w.approved_case(periods=("2026-10",))
            return await w.issuer.issue(case.id)

    done = run(go())
    assert hit == [201]
    assert len(polar.refunds) == 1 and done.state == "issued" and done.issued_cents == 1028
    assert done.polar_reference == polar.refunds[0]["id"]
    assert len(corrections(db_url)) == 1


def test_rate_limited_posts_end_the_case_without_a_refund_and_without_a_second_one(db, db_url, polar):
    """Every refund POST is answered 429 (Retry-After 0): 3 + RATE_LIMITED_POSTS POSTs, a read-back
    before the first and after each, no refund, the intent failed (not made), the case failed and
    safe to retry."""
    from services.issuing import RATE_LIMITED_POSTS, REFUND_POST_ATTEMPTS

    seed(db)
    orders(polar)
    polar.fail("POST", "/v1/refunds/", status=429, retry_after="0", times=1000)

    async def go():
        async with World(db_url, polar) as w:
            case = await w.approved_case(periods=("2026-10",))
            t0 = time.perf_counter()
            done = await w.issuer.issue(case.id)
            return done, time.perf_counter() - t0, await Outbox(w.cases).for_case(case.id)

    done, elapsed, rows = run(go())
    posts = [r for r in polar.server.requests if r.method == "POST" and r.path == "/v1/refunds/"]
    gets = [r for r in polar.server.requests if r.method == "GET" and r.path == "/v1/refunds/"]
    assert len(posts) == REFUND_POST_ATTEMPTS + RATE_LIMITED_POSTS and len(gets) == len(posts) + 1
    assert polar.refunds == [] and done.state == "failed"
    assert [(r["state"], r["attempts"]) for r in rows] == [("failed", len(posts))]


def test_a_worker_whose_connection_dies_right_after_its_fresh_intent_never_posts(db, db_url, polar, monkeypatch):
    """Worker A writes a fresh intent, then its pooled connection dies and its session lock with
    it; worker B takes the case at once. A cannot count its attempt, so it must not POST; B finds
    the untried intent, reads back first and makes the one refund."""
    seed(db)
    orders(polar)
    real_intend = Outbox.intend
    state = {}

    async def intend_then_die(self, *a, **kw):
        row = await real_intend(self, *a, **kw)
        if not state:
            state["pid"] = store_mod._bound.get().info.backend_pid
            with psycopg.connect(db_url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (state["pid"],))
        return row

    monkeypatch.setattr(Outbox, "intend", intend_then_die)

    async def go():
        async with World(db_url, polar) as a, World(db_url, polar) as b:
            case = await a.approved_case(periods=("2026-10",))
            try:
                await a.issuer.issue(case.id)
            except Exception:
                pass
            return await b.issuer.issue(case.id)

    done = run(go())
    assert len(made(polar)) == 1 and done.state == "issued" and done.issued_cents == 1028
    assert len(corrections(db_url)) == 1


def test_a_refund_of_the_case_polar_holds_without_an_outbox_row_is_not_made_twice(db, db_url, polar):
    """The case is issuing (that commit survived); the intent, its attempt and the refund's
    settlement were lost with the database's last commits, but the POST reached Polar. The sweeper
    resumes: `intend` writes a new row, attempts 0; the read-back before its first POST finds the
    refund Polar holds, so it counts as made and nothing is refunded twice."""
    seed(db)
    orders(polar)

    async def go():
        async with World(db_url, polar) as w:
            case = await w.approved_case(periods=("2026-10",))
            await w.cases.move(case.id, "start_issuing", "billing-bot")
            polar.add_refund(october_order(polar), 1028, metadata={
                "case_id": str(case.id), "instance_id": "i-7f3a", "period": "2026-10", "ticket_id": "T-1"})
            return await w.issuer.issue(case.id)

    done = run(go())
    assert len(made(polar)) == 1, [(r["id"], r["amount"]) for r in made(polar)]
    assert done.state == "issued" and done.issued_cents == 1028
