"""Small constructors for rule tests: times as 'MM-DD HH:MM' in 2026, money as strings."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

from handlers.model import CheckInput, Instance, LogEvent, OrgInterval, Pod, Record, UsageEvent
from handlers.timeline import to_us
from services.config import DEFAULT_RATE_CARD, Throttle

DEFAULT_THROTTLE = Throttle(timedelta(hours=8), timedelta(hours=24), timedelta(minutes=30))


def t(text: str, year: int = 2026) -> int:
    """'10-05 08:00' or '10-05 08:00:30' -> microseconds."""
    fmt = "%Y-%m-%d %H:%M:%S" if text.count(":") == 2 else "%Y-%m-%d %H:%M"
    return to_us(datetime.strptime(f"{year}-{text}", fmt).replace(tzinfo=timezone.utc))


def rec(id: int, start: str, end: str, charge: str | None = None, *, tier: str = "gpu", rate: str | None = None,
        instance: str = "i-7f3a", org: str = "o-acme", customer: str = "c-acme", period: str | None = None) -> Record:
    s, e = t(start), t(end)
    rate_d = Decimal(rate) if rate is not None else DEFAULT_RATE_CARD[tier]
    hrs = Decimal(e - s) / Decimal(3_600_000_000)
    total = Decimal(charge) if charge is not None else rate_d * hrs
    return Record(id=id, instance_id=instance, org_id=org, customer_id=customer, tier=tier, rate_per_hour=rate_d,
                  hours_used=hrs, total_charge=total,
                  billing_period=period or datetime.fromtimestamp(s / 1e6, timezone.utc).strftime("%Y-%m"),
                  start=s, end=e)


def inst(instance_id: str = "i-7f3a", *, tier: str = "gpu", status: str = "running", stopped_at: str | None = None,
         heartbeat: str | None = None, org: str = "o-acme", customer: str = "c-acme") -> Instance:
    return Instance(instance_id=instance_id, org_id=org, customer_id=customer, tier=tier, status=status,
                    created_at=t("09-01 00:00"), started_at=t("09-01 00:00"),
                    stopped_at=t(stopped_at) if stopped_at else None,
                    last_heartbeat=t(heartbeat) if heartbeat else None)


def log(at: str, kind: str, detail: str = "", instance: str | None = "i-7f3a", org: str | None = None) -> LogEvent:
    return LogEvent(at=t(at), kind=kind, instance_id=instance, org_id=org, detail=detail, line=f"{at} {kind}")


def pod(tier: str | None = "small", *, terminated: str | None = None, deleted: str | None = None,
        name: str = "i-7f3a-pod") -> Pod:
    return Pod(name=name, tier=tier, terminated_at=t(terminated) if terminated else None,
               deleted_at=t(deleted) if deleted else None)


def event(start: str, end: str, n: int = 0, instance: str = "i-7f3a", record_id: int | None = None) -> UsageEvent:
    return UsageEvent(event_id=f"ev-{start}-{n}", instance_id=instance, start=t(start), end=t(end), record_id=record_id)


def org_iv(r: Record) -> OrgInterval:
    return OrgInterval(instance_id=r.instance_id, record_id=r.id, start=r.start, end=r.end)


def case(records, *, instance=None, periods=("2026-10",), throttle=DEFAULT_THROTTLE, pods=(), logs=(),
         polar=None, org_records=None, **kw) -> CheckInput:
    records = list(records)
    org = list(records) + list(org_records or [])
    return CheckInput(instance=instance or inst(), records=records, periods=list(periods), throttle=throttle,
                     rate_card=dict(DEFAULT_RATE_CARD), pods=list(pods), log_events=list(logs),
                     polar_events=list(polar) if polar is not None else None,
                     org_intervals=[org_iv(r) for r in org], **kw)
