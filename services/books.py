"""The bot's own books for one UTC day (issue 13), read from PostgreSQL and Polar, judged by
handlers/books.py: anomalies of kind `credit_mismatch`, one per case (see `credit_mismatches`).

Reads: the day's billing_corrections rows (by resolved_at) and the bot's cases issued that day
(by issued_at) with their issuances, in one read-only snapshot; then Polar: the refunds of every
order those cases refunded, and, for cases with invoice credit, the usage events carrying
metadata.case_id; then the state of any other case those refunds or rows name.

A case whose Polar data could not be read is not judged on half the facts: it comes back as a
`credit_mismatch` saying it was not checked and why, never as silence (SPEC 5: a report never says
all is well when it could not tell).
"""
from __future__ import annotations

import asyncio
from datetime import date, datetime, time, timedelta, timezone

import httpx

from handlers.books import KIND, correction_case_id, credit_mismatches
from services.db import Database
from services.polar import PolarClient, PolarError, PolarUnavailable
from services.store import Books

POLAR_CONCURRENCY = 8


async def credit_mismatch_anomalies(db: Database, polar: PolarClient, day: date, *,
                                    usage_event_name: str = "compute_hours") -> list[dict]:
    """The day's credit_mismatch anomalies (dicts as handlers.books makes them, by case)."""
    lo = datetime.combine(day, time(0), timezone.utc)
    hi = lo + timedelta(days=1)
    books = Books(db)
    async with db.snapshot() as conn:
        cases = await books.issued_between(conn, lo, hi)
        if not cases and not await _has_corrections(conn, lo, hi):
            return []
        cur = await conn.execute(
            "SELECT id, customer_id, ticket_id, issue_type, credit_amount, resolved_by, resolved_at, notes"
            " FROM billing_corrections WHERE resolved_at >= %s AND resolved_at < %s ORDER BY id", (lo, hi))
        corrections = await cur.fetchall()

    orders = sorted({i["target"] for c in cases.values() for i in c["issuances"] if i["method"] == "refund"})
    invoiced = [c for c in cases.values() if any(i["method"] == "invoice_credit" for i in c["issuances"])]
    gate = asyncio.Semaphore(POLAR_CONCURRENCY)

    async def read(coro):
        async with gate:
            try:
                return True, await coro
            except (PolarError, PolarUnavailable, httpx.HTTPError) as exc:
                return False, f"{type(exc).__name__}: {exc}"

    refund_reads = await asyncio.gather(*(read(polar.refunds_for_order(o)) for o in orders))
    event_reads = await asyncio.gather(*(read(polar.events_with_metadata(c["customer_id"], usage_event_name,
                                                                          "case_id", str(c["id"])))
                                         for c in invoiced))
    refunds, unread = [], {}
    for order_id, (ok, value) in zip(orders, refund_reads):
        if ok:
            refunds.extend(value)
        else:
            for c in cases.values():
                if any(i["method"] == "refund" and i["target"] == order_id for i in c["issuances"]):
                    unread.setdefault(c["id"], f"Polar's refunds of order {order_id} could not be read ({value})")
    ingested = {}
    for c, (ok, value) in zip(invoiced, event_reads):
        if ok:
            ingested[c["id"]] = value
        else:
            unread.setdefault(c["id"], f"Polar's usage events of the case could not be read ({value})")

    judged = {cid: c for cid, c in cases.items() if cid not in unread}
    rows = [r for r in corrections if correction_case_id(r["notes"]) not in unread]
    named = {correction_case_id(r["notes"]) for r in rows}
    for r in refunds:
        try:
            named.add(int(str((r.get("metadata") or {}).get("case_id"))))
        except ValueError:
            pass
    others = sorted(n for n in named if n is not None and n not in cases)
    known: dict[int, str] = {}
    if others:
        known = await books.states(others)

    out = credit_mismatches(rows, judged.values(), refunds, ingested, known_cases=known)
    for cid, why in sorted(unread.items()):
        c = cases[cid]
        out.append({"kind": KIND, "case_id": cid, "instance_id": c["instance_id"], "org_id": c["org_id"],
                    "customer_id": c["customer_id"], "record_ids": [], "overcharge_cents": 0,
                    "claimed_cents": None, "confirmed_cents": None,
                    "detail": f"not checked: {why}; the credit the bot claims for this case is unconfirmed"})
    out.sort(key=lambda a: (str(a["case_id"]), a["detail"]))
    return out


async def _has_corrections(conn, lo, hi) -> bool:
    cur = await conn.execute("SELECT 1 FROM billing_corrections WHERE resolved_at >= %s AND resolved_at < %s LIMIT 1",
                             (lo, hi))
    return await cur.fetchone() is not None

