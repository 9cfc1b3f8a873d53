"""The monthly audit of high-usage accounts (runbook), as `billing-bot report --usage --month M`:
the customers with the most billed charges in the month, their hours, instances, the credits
issued to them in the month (billing_corrections, whoever issued them), their anomalies in the
month by kind (what the daily reconciliation stored per customer: each day of the month from its
latest whole-day run), and whether they are on the watchlist. How many days of the month those
counts cover is said, so a month nobody reconciled never reads as clean: see docs/decisions.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal

from handlers.timeline import fmt_money, hours_text, to_cents
from services.inputs import validate_month
from services.reconcile import KIND_ORDER
from services.store import Store, Watchlist

TOP = 20


@dataclass(frozen=True)
class UsageLine:
    customer_id: str
    instances: int
    hours: Decimal
    charge_cents: int
    credits_cents: int
    credits: int
    watched: bool
    # anomaly kind -> {"count", "overcharge_cents"} in the month's reconciled days, in KIND_ORDER
    anomalies: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"customer_id": self.customer_id, "instances": self.instances, "hours": hours_text(self.hours),
                "charge_cents": self.charge_cents, "credits_cents": self.credits_cents, "credits": self.credits,
                "watchlist": self.watched, "anomalies": self.anomalies}

    def anomalies_text(self) -> str:
        """"duplicate 2 ($4.16), overlap 1 ($0.17)" or "none"."""
        return ", ".join(f"{k} {a['count']} ({fmt_money(a['overcharge_cents'])})" for k, a in self.anomalies.items()) \
            or "none"


@dataclass(frozen=True)
class UsageReport:
    month: str
    customers: list[UsageLine]
    total_customers: int
    total_hours: Decimal
    total_charge_cents: int
    reconciled_days: int = 0  # days of the month whose latest whole-day run stored per-customer counts
    days_in_month: int = 0

    def as_json(self) -> dict:
        return {"month": self.month, "customers": [c.as_json() for c in self.customers],
                "total_customers": self.total_customers, "total_hours": hours_text(self.total_hours),
                "total_charge_cents": self.total_charge_cents, "reconciled_days": self.reconciled_days,
                "days_in_month": self.days_in_month}

    def coverage_text(self) -> str:
        if not self.reconciled_days:
            return "Anomalies: no reconciliation of this month's days is stored, so none can be shown (not: none found)"
        return f"Anomalies from {self.reconciled_days} of {self.days_in_month} days reconciled"

    def as_text(self) -> str:
        lines = [f"Usage in {self.month}: {self.total_customers} customers billed, {hours_text(self.total_hours)} h, "
                 f"{fmt_money(self.total_charge_cents)}",
                 self.coverage_text(),
                 f"Top {len(self.customers)} by charges:"]
        for i, c in enumerate(self.customers, 1):
            lines.append(f"  {i}. {c.customer_id}: {fmt_money(c.charge_cents)}, {hours_text(c.hours)} h, "
                         f"{c.instances} instance{'s' if c.instances != 1 else ''}; credits issued in the month: "
                         f"{c.credits} for {fmt_money(c.credits_cents)}"
                         + (f"; anomalies: {c.anomalies_text()}" if self.reconciled_days else "")
                         + ("; WATCHLIST" if c.watched else ""))
        if not self.customers:
            lines.append("  none: no billing records in the month")
        return "\n".join(lines)


def _month_bounds(month: str) -> tuple[datetime, datetime]:
    y, m = int(month[:4]), int(month[5:])
    lo = datetime(y, m, 1, tzinfo=timezone.utc)
    hi = datetime(y + (m == 12), 1 if m == 12 else m + 1, 1, tzinfo=timezone.utc)
    return lo, hi


async def usage_report(db, month: str, top: int = TOP) -> UsageReport:
    """Charges and hours are summed exactly as billed (the records of billing_period = month);
    money is rounded to cents once per customer, after the sum."""
    month = validate_month(month)
    lo, hi = _month_bounds(month)
    async with db.snapshot() as conn:
        cur = await conn.execute(
            "SELECT count(DISTINCT customer_id) AS n, coalesce(sum(hours_used), 0) AS hours,"
            " coalesce(sum(total_charge), 0) AS charge FROM billing_records WHERE billing_period = %s", (month,))
        totals = await cur.fetchone()
        cur = await conn.execute(
            "SELECT customer_id, count(DISTINCT instance_id) AS instances, sum(hours_used) AS hours,"
            " sum(total_charge) AS charge FROM billing_records WHERE billing_period = %s"
            " GROUP BY customer_id ORDER BY sum(total_charge) DESC, sum(hours_used) DESC, customer_id LIMIT %s",
            (month, top))
        rows = await cur.fetchall()
        ids = [r["customer_id"] for r in rows]
        cur = await conn.execute(
            "SELECT customer_id, count(*) AS n, coalesce(sum(credit_amount), 0) AS amount FROM billing_corrections"
            " WHERE customer_id = ANY(%s) AND resolved_at >= %s AND resolved_at < %s GROUP BY customer_id",
            (ids, lo, hi))
        credits = {r["customer_id"]: (r["n"], r["amount"]) for r in await cur.fetchall()}
    watched = {w["customer_id"] for w in await Watchlist(db).list()}
    # the reconciliation's days are calendar days of the month (UTC), the charges its billing_period
    found, days = await Store(db).customer_anomalies(lo.date(), hi.date(), ids)
    lines = [UsageLine(customer_id=r["customer_id"], instances=r["instances"], hours=r["hours"],
                       charge_cents=to_cents(r["charge"]), credits=credits.get(r["customer_id"], (0, 0))[0],
                       credits_cents=to_cents(Decimal(credits.get(r["customer_id"], (0, Decimal(0)))[1])),
                       watched=r["customer_id"] in watched, anomalies=_by_kind(found.get(r["customer_id"], {})))
             for r in rows]
    return UsageReport(month=month, customers=lines, total_customers=totals["n"], total_hours=totals["hours"],
                       total_charge_cents=to_cents(totals["charge"]), reconciled_days=days,
                       days_in_month=(hi - lo).days)


def _by_kind(kinds: dict[str, dict]) -> dict[str, dict[str, int]]:
    order = {k: i for i, k in enumerate(KIND_ORDER)}
    return {k: {"count": v["anomalies"], "overcharge_cents": v["overcharge_cents"]}
            for k, v in sorted(kinds.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))}
