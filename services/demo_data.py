"""The demo month: one instance per scenario, plus a clean one, in the previous billing period.

The previous month is used so that a check with the default periods (current and previous)
finds it whatever the date; services/embedded.py records the month it seeded and seeds again once
the month has turned, so the demo's stories (and the README's example) hold on any day. There is no cluster and no Polar in the demo, so an instance's true
tier comes from instances.tier and duplicate metering events are not visible.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

from services.config import DEFAULT_RATE_CARD

DEMO_INSTANCES = {
    "i-7f3a": "SPEC 2.3's worked example: a duplicate, an idle stretch and gpu pricing for a small instance",
    "i-stuck01": "stopped on day 12 but billed for two more days",
    "i-runaway01": "ran 14 hours straight past an 8 hour continuous limit",
    "i-daily01": "its org ran two instances past a 16 hour daily limit",
    "i-overlap01": "two records that overlap by an hour",
    "i-clean01": "billed right: nothing to credit",
}


def demo_month(now: datetime | None = None) -> datetime:
    now = now or datetime.now(timezone.utc)
    first = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (first - timedelta(days=1)).replace(day=1)


def seed_demo(conn, now: datetime | None = None) -> None:
    m = demo_month(now)
    period = m.strftime("%Y-%m")

    def at(day: int, hour: float) -> datetime:
        return m + timedelta(days=day - 1, hours=hour)

    def instance(iid, org, cust, tier, status="running", stopped=None, heartbeat=None):
        conn.execute(
            "INSERT INTO instances (instance_id, org_id, customer_id, tier, status, created_at, started_at,"
            " stopped_at, last_heartbeat) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)",
            (iid, org, cust, tier, status, m, m, stopped, heartbeat))

    def record(iid, org, cust, tier, start, end, charge=None, rate=None):
        rate = Decimal(rate) if rate else DEFAULT_RATE_CARD[tier]
        hours = Decimal((end - start).total_seconds()) / 3600
        total = Decimal(charge) if charge else rate * hours
        conn.execute(
            "INSERT INTO billing_records (customer_id, org_id, instance_id, tier, rate_per_hour, hours_used,"
            " total_charge, billing_period, start_time, end_time, created_at)"
            " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
            (cust, org, iid, tier, rate, hours, total, period, start, end, end))

    def hourly(iid, org, cust, tier, start, end):
        t = start
        while t < end:
            record(iid, org, cust, tier, t, min(t + timedelta(hours=1), end))
            t += timedelta(hours=1)

    # SPEC 2.3, shifted into the demo month: credit $10.28.
    instance("i-7f3a", "o-acme", "c-acme", "small", heartbeat=at(5, 9))
    record("i-7f3a", "o-acme", "c-acme", "gpu", at(5, 8), at(5, 10), "4.16")
    record("i-7f3a", "o-acme", "c-acme", "gpu", at(5, 8), at(5, 10), "4.16")
    record("i-7f3a", "o-acme", "c-acme", "gpu", at(5, 10), at(5, 11), "2.08")

    # Stopped at 17:00 on day 12, metering went on for two more days.
    instance("i-stuck01", "o-globex", "c-globex", "gpu", status="stopped", stopped=at(12, 17), heartbeat=at(12, 16.9))
    hourly("i-stuck01", "o-globex", "c-globex", "gpu", at(12, 9), at(14, 17))

    # Throttle never paused it: 8 h continuous limit, billed 06:00-20:00.
    conn.execute("INSERT INTO throttle_settings VALUES ('o-initech', '8 hours', NULL, NULL)")
    instance("i-runaway01", "o-initech", "c-initech", "large", heartbeat=at(20, 20))
    hourly("i-runaway01", "o-initech", "c-initech", "large", at(20, 6), at(20, 20))

    # Two instances of one org, 00:00-12:00 each, daily limit 16 h: reached at 08:00.
    conn.execute("INSERT INTO throttle_settings VALUES ('o-hooli', NULL, '16 hours', NULL)")
    instance("i-daily01", "o-hooli", "c-hooli", "gpu", heartbeat=at(22, 12))
    instance("i-daily02", "o-hooli", "c-hooli", "gpu", heartbeat=at(22, 12))
    hourly("i-daily01", "o-hooli", "c-hooli", "gpu", at(22, 0), at(22, 12))
    hourly("i-daily02", "o-hooli", "c-hooli", "gpu", at(22, 0), at(22, 12))

    # A metering retry wrote an overlapping record.
    instance("i-overlap01", "o-umbrella", "c-umbrella", "medium", heartbeat=at(8, 13))
    record("i-overlap01", "o-umbrella", "c-umbrella", "medium", at(8, 10), at(8, 12))
    record("i-overlap01", "o-umbrella", "c-umbrella", "medium", at(8, 11), at(8, 13))

    # Clean: 6 hours on two days, right tier, heartbeats current.
    instance("i-clean01", "o-acme", "c-acme", "medium", heartbeat=at(3, 15))
    hourly("i-clean01", "o-acme", "c-acme", "medium", at(2, 9), at(2, 15))
    hourly("i-clean01", "o-acme", "c-acme", "medium", at(3, 9), at(3, 15))

    for iid, org, day, hours in [("i-clean01", "o-acme", 2, 6), ("i-clean01", "o-acme", 3, 6),
                                 ("i-runaway01", "o-initech", 20, 14), ("i-daily01", "o-hooli", 22, 12),
                                 ("i-daily02", "o-hooli", 22, 12)]:
        conn.execute("INSERT INTO instance_usage VALUES (%s,%s,%s,%s)", (org, iid, at(day, 0).date(), hours))
