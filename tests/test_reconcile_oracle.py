"""The set-based reconciliation against the plain-Python oracle (tests/reconcile_reference.py) on
random days: duplicates, partial and nested overlaps, ids out of time order, runs that began the
day before, gaps of exactly 60 s, orgs with their own limits or none, stopped and idle instances,
usage off and within the tolerance. Every anomaly's kind, customer, record ids and cents must agree."""
import random
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from services.config import parse_config

from . import reconcile_reference as ref
from .test_reconcile import run

DAY = date(2026, 10, 5)
LO = datetime(2026, 10, 5, tzinfo=timezone.utc)
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
US = ref.US
CARD = {"small": Decimal("0.083"), "medium": Decimal("0.167"), "large": Decimal("0.333"), "gpu": Decimal("2.08")}
# org -> (continuous, daily, idle) as SQL intervals; the oracle gets microseconds
THROTTLES = {"o-1": ("3 hours", "6 hours", "20 minutes"), "o-2": (None, "4 hours", None),
             "o-3": ("2 hours", None, "1 hour")}
DEFAULTS = (8 * 3600 * US, 24 * 3600 * US, 30 * 60 * US)  # parse_config({})'s defaults


def _us(t: datetime) -> int:
    return (t - EPOCH) // timedelta(microseconds=1)


def _hours(text: str | None) -> int | None:
    if text is None:
        return None
    n, unit = text.split()
    return int(n) * (3600 if unit.startswith("hour") else 60) * US


def make_day(db, seed: int, storm: bool = False):
    """Random control-plane rows around DAY; returns the oracle's inputs. A storm day is a metering
    retry storm: every record of every instance shares time with another record of its instance."""
    rng = random.Random(seed)
    records, instances, usage = [], {}, {}
    for org, (c, d, i) in THROTTLES.items():
        db.execute("INSERT INTO throttle_settings VALUES (%s, %s::interval, %s::interval, %s::interval)", (org, c, d, i))
    ids = rng.sample(range(1, 100_000), 1200 if storm else 400)  # ids out of time order: "lower id billed first" matters
    for o in range(4):
        org, customer = f"o-{o}", f"c-{o}"
        for k in range(3):
            iid = f"i-{o}{k}"
            tier = rng.choice(list(CARD))
            status = rng.choice(["running", "running", "stopped", "paused"])
            stopped = LO + timedelta(minutes=rng.randrange(-600, 1500)) if status != "running" else None
            heartbeat = LO + timedelta(minutes=rng.randrange(-300, 1500)) if rng.random() < 0.8 else None
            db.execute("INSERT INTO instances VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                       (iid, org, customer, tier, status, LO - timedelta(days=3), LO - timedelta(days=3),
                        stopped, heartbeat))
            instances[iid] = ref.Inst(iid, customer, status, _us(stopped) if stopped else None,
                                      _us(heartbeat) if heartbeat else None)
            t = LO - timedelta(minutes=rng.randrange(60, 900))
            while t < LO + timedelta(hours=26):
                length = timedelta(seconds=30 * rng.randrange(10, 600))
                rate = CARD[tier] if rng.random() > 0.1 else rng.choice([Decimal("0.1"), Decimal("2.08")])
                hours = Decimal(length.total_seconds()) / 3600
                hours = hours.quantize(Decimal("0.0001"))
                if rng.random() < 0.05:
                    hours += Decimal("0.01")  # hours_used off the interval
                charge = (rate * hours).quantize(Decimal("0.0001"))
                if rng.random() < 0.05:
                    charge += Decimal("0.02")  # total_charge off rate x hours
                spans = [(t, t + length)]
                roll = rng.random()
                if roll < 0.08:
                    spans.append((t, t + length))  # exact duplicate
                elif roll < 0.16:
                    spans.append((t + length / 3, t + length + timedelta(minutes=rng.randrange(1, 90))))  # overlap
                elif roll < 0.2:
                    spans.append((t + length / 4, t + length / 2))  # nested inside
                elif storm:  # a retry re-billing a shifted copy: partial overlap, sometimes twice
                    for _ in range(rng.choice([1, 1, 2])):
                        shift = length * rng.randrange(1, 9) / 10
                        spans.append((t + shift, t + shift + length))
                for s, e in spans:
                    rid = ids.pop()
                    db.execute(
                        "INSERT INTO billing_records (id, customer_id, org_id, instance_id, tier, rate_per_hour,"
                        " hours_used, total_charge, billing_period, start_time, end_time, created_at)"
                        " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                        (rid, customer, org, iid, tier, rate, hours, charge, s.strftime("%Y-%m"), s, e, e))
                    records.append(ref.Rec(rid, iid, org, customer, tier, rate, hours, charge, _us(s), _us(e)))
                t += length + timedelta(seconds=rng.choice([0, 30, 60, 61, 300, 3600, 7200]))
            billed = sum((Decimal(min(r.e, _us(LO) + 86400 * US) - max(r.s, _us(LO))) / (3600 * US)
                          for r in records if r.instance == iid and r.e > _us(LO) and r.s < _us(LO) + 86400 * US),
                         Decimal(0))
            roll = rng.random()
            if roll < 0.7:
                hours = (billed + Decimal(rng.choice([0, 0, "0.05", "-0.05", "0.5", "-2"]))).quantize(Decimal("0.0001"))
                db.execute("INSERT INTO instance_usage VALUES (%s,%s,%s,%s)", (org, iid, DAY, max(hours, Decimal(0))))
                usage[(iid, org)] = max(hours, Decimal(0))
    db.execute("INSERT INTO instances VALUES ('i-ghost','o-0','c-0','small','running',%s,%s,NULL,NULL)",
               (LO - timedelta(days=3), LO - timedelta(days=3)))
    db.execute("INSERT INTO instance_usage VALUES ('o-0','i-ghost',%s,3)", (DAY,))  # ran but never billed
    instances["i-ghost"] = ref.Inst("i-ghost", "c-0", "running", None, None)
    usage[("i-ghost", "o-0")] = Decimal(3)
    throttles = {org: tuple(_hours(x) for x in v) for org, v in THROTTLES.items()}
    return records, instances, throttles, usage


@pytest.mark.parametrize("seed, storm", [(seed, False) for seed in range(6)] + [(seed, True) for seed in range(6, 9)])
def test_sql_agrees_with_the_oracle(db, db_url, seed, storm):
    records, instances, throttles, usage = make_day(db, seed, storm)
    if storm:  # the shape the day must have: no record of the day stands alone
        day = [r for r in records if r.e > _us(LO) and r.s < _us(LO) + 86400 * US]
        assert all(any(q.instance == r.instance and q.id != r.id and q.s < r.e and q.e > r.s for q in records)
                   for r in day)
    config = parse_config({})
    want = ref.reconcile(records, instances, throttles, usage, _us(LO), _us(LO) + 86400 * US, CARD, DEFAULTS,
                         config.usage_tolerance_hours)
    got = {(a.kind, a.instance_id or a.org_id): (a.customer_id, a.record_ids, a.overcharge_cents)
           for a in run(db_url, DAY, config).anomalies}
    kinds = {k for k, _ in want}
    # the random days must exercise every kind, or the comparison proves little
    assert kinds == {"rate_mismatch", "charge_mismatch", "duplicate", "overlap", "billed_after_stop",
                     "billed_while_idle", "usage_mismatch", "continuous_limit", "daily_limit"}, kinds
    assert got == want
