"""A check reads only the history that can change its periods (services/db.py `records` with periods,
`org_intervals`): on random histories the bounded read gives the same case as the whole history fed
to the pure rules: every finding, cent, hour, record id, covered piece and credit per period."""
import asyncio
import random
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from handlers.model import CheckInput, OrgInterval, UsageEvent
from handlers.pipeline import days_for_daily_limit, finish, first_steps, run_case
from handlers.timeline import from_us
from services.config import parse_config
from services.db import Database

from .seed import throttle as seed_throttle

BASE = datetime(2026, 9, 1, tzinfo=timezone.utc)
GAPS = [0, 0, 30, 60, 61, 90, 600, 3600, 6 * 3600, 2 * 86400]
THROTTLES = [("3 hours", "5 hours", "20 minutes"), ("8 hours", "20 hours", None), (None, "2 hours", "1 hour"),
             ("2 hours", None, None)]


def seed_history(db, rng):
    """The checked instance i-p and three others of its org, over three months, with overlaps, exact
    copies, ids out of time order, records billed into the previous period, and empty records."""
    c, d, i = rng.choice(THROTTLES)
    seed_throttle(db, "o-p", c, d, i)
    status = rng.choice(["running", "stopped"])
    stopped = BASE + timedelta(days=rng.randrange(20, 80)) if status == "stopped" else None
    heartbeat = BASE + timedelta(days=rng.randrange(10, 90), minutes=rng.randrange(1440)) if rng.random() < 0.6 else None
    db.execute("INSERT INTO instances VALUES ('i-p','o-p','c-p','small',%s,%s,%s,%s,%s)",
               (status, BASE, BASE, stopped, heartbeat))
    rows = []
    for iid, n in [("i-p", rng.randrange(250, 330)), ("i-q", 150), ("i-r", 150), ("i-s", 100)]:
        t = BASE + timedelta(minutes=rng.randrange(0, 600))
        for _ in range(n):
            length = timedelta(seconds=rng.choice([60, 300, 3600, 3600, 7200, 5 * 3600, 11 * 3600]))
            spans = [(t, t + length)]
            roll = rng.random()
            if roll < 0.1:
                spans.append((t, t + length))
            elif roll < 0.2:
                spans.append((t + length / 2, t + length * 2))
            elif roll < 0.23:
                spans.append((t + length / 3, t + length / 3))  # no time: skipped by the rules
            for s, e in spans:
                period = s.strftime("%Y-%m")
                if s.day == 1 and rng.random() < 0.5:  # billed into the period before
                    period = (s - timedelta(days=2)).strftime("%Y-%m")
                rows.append((iid, s, e, period))
            t += length + timedelta(seconds=rng.choice(GAPS))
    ids = rng.sample(range(1, 100_000), len(rows))
    for rid, (iid, s, e, period) in zip(ids, rows):
        hours = (Decimal((e - s).total_seconds()) / 3600).quantize(Decimal("0.0001"))
        db.execute("INSERT INTO billing_records (id, customer_id, org_id, instance_id, tier, rate_per_hour,"
                   " hours_used, total_charge, billing_period, start_time, end_time) VALUES"
                   " (%s,'c-p','o-p',%s,'gpu',2.08,%s,%s,%s,%s,%s)",
                   (rid, iid, hours, (hours * Decimal("2.08")).quantize(Decimal("0.0001")), period, s, e))


def comparable(result):
    """The whole case, less the Polar lines about intervals outside the checked periods' history:
    those intervals credit nothing, and a bounded read does not see their records."""
    findings = [replace(f, evidence=[x for x in f.evidence if not x.startswith("Polar has")])
                for f in result.findings]
    return (findings, result.credit_cents, result.covered, result.credit_by_period, result.notes,
            result.true_tier)


def both_ways(db_url, periods, rng):
    async def go():
        dbx = await Database.connect(db_url)
        try:
            async with dbx.snapshot() as conn:
                inst = await dbx.instance(conn, "i-p")
                thr, _ = await dbx.throttle(conn, "o-p", parse_config({}).throttle_defaults)
                bounded = await dbx.records(conn, "i-p", periods)
                whole = await dbx.records(conn, "i-p")
                org = [(await dbx.records(conn, i)) for i in ("i-p", "i-q", "i-r", "i-s")]
                # Polar: one event per record, and extra events for some intervals anywhere in time
                events = [UsageEvent(f"e{r.id}", "i-p", r.start, r.end, r.id) for r in whole]
                events += [UsageEvent(f"x{k}", "i-p", r.start, r.end, None)
                           for k, r in enumerate(rng.sample(whole, 8))]
                base = dict(instance=inst, periods=periods, throttle=thr, rate_card=parse_config({}).rate_card,
                            polar_events=events)
                walk = first_steps(CheckInput(records=bounded, **base))
                days = [from_us(d) for d in days_for_daily_limit(walk)]
                intervals = await dbx.org_intervals(conn, "o-p", days, thr.daily_limit) if days else None
                got = finish(walk, intervals)
                everything = [OrgInterval(r.instance_id, r.id, r.start, r.end) for rs in org for r in rs]
                want = run_case(CheckInput(records=whole, org_intervals=everything, **base))
                return got, want, len(bounded), len(whole)
        finally:
            await dbx.close()
    return asyncio.run(go())


@pytest.mark.parametrize("seed", range(10))
def test_a_bounded_check_equals_the_whole_history(db, db_url, seed):
    rng = random.Random(seed)
    seed_history(db, rng)
    periods = sorted(rng.sample(["2026-09", "2026-10", "2026-11"], rng.choice([1, 1, 2])))
    got, want, n_bounded, n_whole = both_ways(db_url, periods, rng)
    assert comparable(got) == comparable(want)
    assert n_bounded <= n_whole


def test_a_bounded_check_reads_less_and_still_finds_what_history_decides(db, db_url):
    """The comparison proves little unless the bound leaves records out and the case still holds the
    kinds that history outside the periods can change (a run begun before them, a stop window)."""
    rng = random.Random(8)
    seed_history(db, rng)
    periods = sorted(rng.sample(["2026-09", "2026-10", "2026-11"], rng.choice([1, 1, 2])))
    got, want, n_bounded, n_whole = both_ways(db_url, periods, rng)
    assert comparable(got) == comparable(want)
    assert n_bounded < n_whole / 2
    assert {f.kind for f in got.findings} >= {"duplicate_charge", "stuck_instance", "throttle_continuous",
                                              "throttle_daily"}
