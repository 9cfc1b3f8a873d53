"""Insert control-plane rows for integration tests."""
from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal


def ts(text: str) -> datetime:
    """'2026-10-05 08:00' -> aware UTC datetime."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=timezone.utc)


def instance(conn, instance_id, org="o-acme", customer="c-acme", tier="gpu", status="running",
             stopped_at=None, heartbeat=None, created="2026-09-01 00:00"):
    conn.execute("INSERT INTO instances VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                 (instance_id, org, customer, tier, status, ts(created), ts(created),
                  ts(stopped_at) if stopped_at else None, ts(heartbeat) if heartbeat else None))


def record(conn, id, instance_id, start, end, charge, tier="gpu", rate="2.08", org="o-acme", customer="c-acme",
           period=None):
    s, e = ts(start), ts(end)
    hours = Decimal((e - s).total_seconds()) / 3600
    conn.execute(
        "INSERT INTO billing_records (id, customer_id, org_id, instance_id, tier, rate_per_hour, hours_used,"
        " total_charge, billing_period, start_time, end_time, created_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
        (id, customer, org, instance_id, tier, Decimal(rate), hours, Decimal(charge), period or start[:7], s, e, e))


def throttle(conn, org, continuous, daily, idle):
    conn.execute("INSERT INTO throttle_settings VALUES (%s,%s::interval,%s::interval,%s::interval)",
                 (org, continuous, daily, idle))
