"""Which Polar order invoiced a billing period (SPEC 4), and what it can still refund. Pure."""
from __future__ import annotations

from datetime import datetime, timezone


def invoicing_order(orders: list[dict], period: str) -> dict | None:
    """The customer's earliest subscription_cycle order created on or after the first day of the
    month after the period (SPEC 4)."""
    y, m = int(period[:4]), int(period[5:7])
    first_next = datetime(y + (m == 12), m % 12 + 1, 1, tzinfo=timezone.utc)
    candidates = [o for o in orders if o.get("billing_reason") == "subscription_cycle"
                  and _parse(o["created_at"]) >= first_next]
    return min(candidates, key=lambda o: _parse(o["created_at"])) if candidates else None


def refund_room(orders: list[dict], periods: list[str]) -> dict[str, dict]:
    """Per period: the invoicing order (its invoice number) and what it can still refund, in cents;
    {"invoice": None} when the period is not invoiced yet."""
    out = {}
    for period in periods:
        order = invoicing_order(orders, period)
        out[period] = ({"invoice": None, "refundable_cents": 0} if order is None else
                       {"invoice": order.get("invoice_number") or order["id"],
                        "refundable_cents": int(order.get("refundable_amount") or 0)})
    return out


def _parse(text: str) -> datetime:
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
