"""The weekly review of credits issued (runbook: 'Weekly review of credits issued'), for Slack and finance.

Credits come from billing_corrections (every credit, whoever issued it); levels, refusals and
rejections from the bot's own cases and audit events.
"""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal

from handlers.timeline import fmt_money


@dataclass
class CreditsReport:
    since: date
    total_cents: int
    count: int
    by_kind: list[tuple[str, int, int]]       # kind, count, cents
    by_approver: list[tuple[str, int, int]]
    by_level: list[tuple[int, int, int]]
    top_customers: list[tuple[str, int, int]]
    refusals: int
    rejections: list[tuple[int, str, str, str]]  # case, instance, by, reason
    rows: list[dict]
    # a remediation batch's credits (one corrections row per customer) as one line each
    batches: list[tuple[str, str, int, int]] = field(default_factory=list)  # batch, what, count, cents

    def as_text(self) -> str:
        lines = [f"Credits issued since {self.since.isoformat()}: {self.count} for {fmt_money(self.total_cents)}"]
        for title, items in (("By kind", self.by_kind), ("By approver", self.by_approver),
                             ("By level", [(f"level {lv}", n, c) for lv, n, c in self.by_level]),
                             ("Largest customers", self.top_customers)):
            lines.append(f"{title}:")
            lines += [f"  {name}: {n} credit(s), {fmt_money(c)}" for name, n, c in items] or ["  none"]
        if self.batches:
            lines.append("Remediation batches (one line each; their credits are counted above too):")
            lines += [f"  {name} ({what}): {n} customer(s), {fmt_money(c)}" for name, what, n, c in self.batches]
        lines.append(f"Refused approval attempts: {self.refusals}")
        lines.append(f"Rejected cases: {len(self.rejections)}")
        lines += [f"  #{cid} {inst} by {by}: {reason}" for cid, inst, by, reason in self.rejections[:20]]
        return "\n".join(lines)

    def as_csv(self) -> str:
        out = io.StringIO()
        w = csv.writer(out)
        w.writerow(["id", "resolved_at", "customer_id", "ticket_id", "issue_type", "credit_amount", "resolved_by", "notes"])
        for r in self.rows:
            w.writerow([r["id"], r["resolved_at"].isoformat(), r["customer_id"], r["ticket_id"] or "", r["issue_type"],
                        f"{r['credit_amount']:.2f}", r["resolved_by"], r["notes"] or ""])
        return out.getvalue()


def since_for(span: str, today: date) -> date:
    return today - timedelta(days=30 if span == "month" else 7)


def _cents(amount: Decimal) -> int:
    return int((amount * 100).to_integral_value())


async def credits_report(store, since: date) -> CreditsReport:
    """store: services.store.CaseStore (billing_corrections through its database, the bot's own
    cases and events through the store's queries)."""
    lo = datetime.combine(since, time(0), timezone.utc)
    async with store.db.snapshot() as conn:
        cur = await conn.execute(
            "SELECT id, customer_id, ticket_id, issue_type, credit_amount, resolved_by, resolved_at, notes"
            " FROM billing_corrections WHERE resolved_at >= %s ORDER BY resolved_at, id", (lo,))
        rows = await cur.fetchall()
    levels, refusals, rejected = await store.credits_rows(lo)
    by_level = [(r["required_level"], r["n"], int(r["cents"])) for r in levels]
    rejections = [(r["id"], r["instance_id"], r["decided_by"], r["reason"] or "") for r in rejected]

    def group(key):
        acc: dict[str, list[int]] = {}
        for r in rows:
            a = acc.setdefault(r[key], [0, 0])
            a[0] += 1
            a[1] += _cents(r["credit_amount"])
        return sorted(((k, n, c) for k, (n, c) in acc.items()), key=lambda x: (-x[2], x[0]))

    batches = []
    for ticket, n, cents in sorted(group("ticket_id"), key=lambda x: x[0] or ""):
        m = re.fullmatch(r"batch-(\d+)", ticket or "")
        if m:
            b = await store.batch_summary(int(m.group(1)))
            # customers, not rows: a customer's remainder (invoice credit) is a second row of the batch
            customers = len({r["customer_id"] for r in rows if r["ticket_id"] == ticket})
            batches.append((ticket, f"{b['kind']} {b['period']}" if b else "unknown batch", customers, cents))
    return CreditsReport(
        since=since, batches=batches, total_cents=sum(_cents(r["credit_amount"]) for r in rows), count=len(rows),
        by_kind=group("issue_type"), by_approver=group("resolved_by"), by_level=by_level,
        top_customers=group("customer_id")[:5], refusals=refusals, rejections=rejections, rows=rows)
