"""services/books.py against a real PostgreSQL (rows inserted directly, as issuing leaves them)
and our Polar server: the day's credit_mismatch anomalies."""
import asyncio
import json
from datetime import date, datetime, timezone

import psycopg

from services.books import credit_mismatch_anomalies
from services.db import Database
from services.polar import PolarClient
from services.store import Store

from .fakes.polar_server import TOKEN

DAY = date(2026, 11, 3)


def _migrate(db_url):
    async def go():
        db = await Database.connect(db_url)
        try:
            await Store(db).migrate()
        finally:
            await db.close()
    asyncio.run(go())


def _case(conn, cid, *, state="issued", issued_cents=1028, method="refund", issued_at="2026-11-03 10:00",
          customer="c-acme"):
    conn.execute(
        "INSERT INTO billing_bot.cases (id, instance_id, org_id, customer_id, periods, state, proposed_cents,"
        " credit_cents, issued_cents, required_level, report, requested_by, method, issued_at, polar_reference)"
        " VALUES (%s, 'i-7f3a', 'o-acme', %s, '{2026-10}', %s, %s, %s, %s, 1, %s, 'U1', %s, %s, %s)",
        (cid, customer, state, issued_cents, issued_cents, issued_cents if state == "issued" else None,
         json.dumps({"findings": []}), method, issued_at if state == "issued" else None, f"ref-{cid}"))


def _issuance(conn, cid, method, target, cents, state="confirmed", ref=None):
    conn.execute("INSERT INTO billing_bot.issuances (case_id, method, target, period, amount_cents, state, polar_ref)"
                 " VALUES (%s, %s, %s, '2026-10', %s, %s, %s)", (cid, method, target, cents, state, ref))


def _row(conn, cid, dollars, resolved_at="2026-11-03 10:00", notes=None):
    conn.execute("INSERT INTO billing_corrections (customer_id, ticket_id, issue_type, credit_amount, resolved_by,"
                 " resolved_at, notes) VALUES ('c-acme', 'T-1', 'stuck_instance', %s, 'U_LEAD', %s, %s)",
                 (dollars, resolved_at, notes or f"billing-bot case {cid} (i-7f3a, 2026-10); method refund; Polar: x"))


def _anomalies(db_url, polar, day=DAY, attempts=4):
    async def go():
        db = await Database.connect(db_url)
        client = PolarClient(polar.url, TOKEN, backoff=0.01, attempts=attempts)
        try:
            return await credit_mismatch_anomalies(db, client, day)
        finally:
            await client.close()
            await db.close()
    return asyncio.run(go())


def test_the_days_books_against_polar(db_url, polar):
    _migrate(db_url)
    polar.add_customer("c-acme")
    nov = polar.add_order("c-acme", datetime(2026, 11, 1, 0, 5, tzinfo=timezone.utc), 50_000)
    dec = polar.add_order("c-acme", datetime(2026, 12, 1, 0, 5, tzinfo=timezone.utc), 50_000)
    ok = polar.add_refund(nov, 1028, "succeeded", {"case_id": "1"}, "service_disruption")
    pending = polar.add_refund(dec, 500, "pending", {"case_id": "2"}, "service_disruption")
    polar.add_refund(nov, 700, "succeeded", {"case_id": "5"}, "duplicate")  # case 5 failed: money unaccounted
    polar.add_refund(nov, 300, "succeeded", {"case_id": "6"}, "duplicate")  # case 6 issued yesterday: fine
    polar.refund_outside(nov["id"], 100)  # Polar's own: not the bot's credit
    polar.add_usage_event("c-acme", "compute_hours", {"case_id": "3", "hours": -1.5, "tier": "gpu"})
    with psycopg.connect(db_url, autocommit=True) as conn:
        _case(conn, 1)
        _issuance(conn, 1, "refund", nov["id"], 1028, ref=ok["id"])
        _row(conn, 1, "10.28")
        _case(conn, 2, issued_cents=500)
        _issuance(conn, 2, "refund", dec["id"], 500, ref=pending["id"])
        _row(conn, 2, "5.00")
        _case(conn, 3, method="invoice_credit", issued_cents=312)
        _issuance(conn, 3, "invoice_credit", "billing-bot-case-3", 312, ref="1 usage events billing-bot-case-3-*")
        _row(conn, 3, "3.12")
        _case(conn, 4, method="invoice_credit", issued_cents=99)  # Polar has none of its events
        _issuance(conn, 4, "invoice_credit", "billing-bot-case-4", 99, ref="1 usage events billing-bot-case-4-*")
        _row(conn, 4, "0.99")
        _case(conn, 5, state="failed")
        _case(conn, 6, issued_cents=300, issued_at="2026-11-02 23:59:59")
        _issuance(conn, 6, "refund", nov["id"], 300)
        _row(conn, 6, "3.00", resolved_at="2026-11-02 23:59:59")  # yesterday's books
        _row(conn, None, "42.00", notes="refunded by hand for ticket T-77")  # a person's own correction
    out = _anomalies(db_url, polar)
    assert [(a["case_id"], a["claimed_cents"], a["confirmed_cents"]) for a in out] == [
        (2, 500, 0), (4, 99, 0), (5, 0, 700)]
    by = {a["case_id"]: a for a in out}
    assert by[2]["detail"] == (f"billing_corrections says $5.00, Polar confirms $0.00; not money: refund "
                               f"{pending['id']} pending $5.00")
    assert "Polar has no usage events for the case" in by[4]["detail"]
    assert "for case 5, which is failed: money moved that no issued case accounts for" in by[5]["detail"]
    assert all(a["kind"] == "credit_mismatch" and a["overcharge_cents"] == 0 for a in out)
    assert (by[2]["customer_id"], by[2]["instance_id"], by[2]["org_id"]) == ("c-acme", "i-7f3a", "o-acme")
    # the next day: case 2's refund succeeded meanwhile, but its books are the 3rd's; the 4th has none
    polar.settle_refund(pending["id"], "succeeded")
    assert [a["case_id"] for a in _anomalies(db_url, polar)] == [4, 5]
    assert _anomalies(db_url, polar, day=date(2026, 11, 4)) == []


def test_a_case_polar_could_not_answer_for_is_said_unchecked(db_url, polar):
    _migrate(db_url)
    polar.add_customer("c-acme")
    nov = polar.add_order("c-acme", datetime(2026, 11, 1, 0, 5, tzinfo=timezone.utc), 50_000)
    ok = polar.add_refund(nov, 1028, "succeeded", {"case_id": "1"}, "service_disruption")
    with psycopg.connect(db_url, autocommit=True) as conn:
        _case(conn, 1)
        _issuance(conn, 1, "refund", nov["id"], 1028, ref=ok["id"])
        _row(conn, 1, "10.28")
    polar.fail("GET", "/v1/refunds/", status=503, times=2)
    [a] = _anomalies(db_url, polar, attempts=2)
    assert a["case_id"] == 1 and a["claimed_cents"] is None and a["confirmed_cents"] is None
    assert a["detail"].startswith(f"not checked: Polar's refunds of order {nov['id']} could not be read (PolarUnavailable")
    assert _anomalies(db_url, polar, attempts=2) == []  # Polar answers again: the books agree


def test_no_bot_schema_means_no_bot_credits(db_url, polar):
    with psycopg.connect(db_url, autocommit=True) as conn:
        _row(conn, None, "42.00", notes="refunded by hand")
    assert _anomalies(db_url, polar) == []
    assert polar.server.requests == []


def test_reconcile_adds_the_books_check_with_the_case(db, db_url, polar, bot_env):
    """`billing-bot reconcile` (issue 13): an issued case whose refund Polar no longer holds as
    succeeded is a credit_mismatch anomaly naming the case."""
    import json as _json
    import subprocess
    import sys
    from datetime import datetime as _dt, timezone as _tz

    from .test_issuing import approve_and_issue_october, orders as _orders, seed as _seed

    _seed(db)
    _orders(polar)
    done, _ = approve_and_issue_october(db_url, polar)
    assert done.state == "issued"
    today = _dt.now(_tz.utc).date().isoformat()
    clean = subprocess.run([sys.executable, "-m", "bot.cli", "reconcile", "--date", today, "--json"], env=bot_env,
                           capture_output=True, text=True, timeout=120)
    assert clean.returncode == 0, clean.stderr
    assert not [a for a in _json.loads(clean.stdout)["anomalies"] if a["kind"] == "credit_mismatch"]
    polar.refunds[0]["status"] = "failed"  # Polar no longer holds the money the books claim
    out = subprocess.run([sys.executable, "-m", "bot.cli", "reconcile", "--date", today, "--json"], env=bot_env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    found = [a for a in _json.loads(out.stdout)["anomalies"] if a["kind"] == "credit_mismatch"]
    assert len(found) == 1 and found[0]["case_id"] == done.id and f"case #{done.id}" in found[0]["detail"]
