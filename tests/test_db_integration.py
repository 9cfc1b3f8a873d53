"""The investigation's database reads on real PostgreSQL."""
import asyncio
from datetime import datetime, timezone

import pytest

from handlers.pipeline import run_case
from handlers.throttle import instance_unions_by_day, limit_reached_at
from services.config import parse_config
from services.db import Database
from services.investigation import Investigator, UnknownInstance, default_periods

from .builders import case, rec
from .seed import instance, record, throttle


def investigate(url, instance_id, periods=None, now=None):
    async def go():
        db = await Database.connect(url)
        try:
            inv = Investigator(parse_config({}), db, now=now)
            return await inv.check(instance_id, periods)
        finally:
            await db.close()
    return asyncio.run(go())


def test_daily_limit_across_the_org_from_the_database(db, db_url):
    throttle(db, "o-busy", None, "10 hours", None)
    for i in range(3):
        instance(db, f"i-b{i}", org="o-busy", customer="c-busy", heartbeat="2026-10-09 00:00")
    n = 1
    for i in range(3):
        for h in range(0, 6):  # each instance 00:00-06:00: 18 h of org time; 10 h reached at 03:20
            record(db, n, f"i-b{i}", f"2026-10-08 {h:02d}:00", f"2026-10-08 {h + 1:02d}:00", "2.08",
                   org="o-busy", customer="c-busy")
            n += 1
    # an exact duplicate of i-b1's first hour must not count twice toward the org's total
    record(db, 99, "i-b1", "2026-10-08 00:00", "2026-10-08 01:00", "2.08", org="o-busy", customer="c-busy")
    report = investigate(db_url, "i-b0", ["2026-10"])
    got = {f.kind: f.credit_cents for f in report.result.findings}
    # excess 03:20-06:00 = 2 h 40 m of gpu: 2.08 x 8/3 = 5.5466.. -> 555
    assert got == {"throttle_daily": 555}
    assert report.throttle_text.startswith("continuous off, daily 10h, idle off")


def test_db_prefilter_and_merge_agree_with_the_pure_rule(db, db_url):
    """The SQL returns merged spans only for days over the limit; the result equals the pure rule fed
    every org record."""
    throttle(db, "o-x", "30 hours", "20 hours", None)
    recs = []
    n = 1
    for i in range(4):
        instance(db, f"i-x{i}", org="o-x", customer="c-x", heartbeat="2026-10-20 00:00")
        for d in range(3, 6):
            for h in range(i, 20 - i, 2):
                start, end = f"2026-10-{d:02d} {h:02d}:00", f"2026-10-{d:02d} {h + 3:02d}:00"
                record(db, n, f"i-x{i}", start, end, "1.00", org="o-x", customer="c-x")
                recs.append(rec(n, start[5:], end[5:], "1.00", instance=f"i-x{i}", org="o-x", customer="c-x"))
                n += 1
    report = investigate(db_url, "i-x0", ["2026-10"])
    pure = run_case(case([r for r in recs if r.instance_id == "i-x0"],
                         org_records=[r for r in recs if r.instance_id != "i-x0"],
                         throttle=parse_config({"throttle_defaults": {"continuous_limit": "30h", "daily_limit": "20h",
                                                                      "idle_timeout": None}}).throttle_defaults,
                         pods=[]))
    pure_daily = [f.credit_cents for f in pure.findings if f.kind == "throttle_daily"]
    db_daily = [f.credit_cents for f in report.result.findings if f.kind == "throttle_daily"]
    assert db_daily == pure_daily and db_daily and db_daily[0] > 0


def test_null_throttle_columns_switch_limits_off(db, db_url):
    throttle(db, "o-free", None, None, None)
    instance(db, "i-f", org="o-free", customer="c-free", heartbeat="2026-10-01 00:00")
    for h in range(0, 20):
        record(db, h + 1, "i-f", f"2026-10-05 {h:02d}:00", f"2026-10-05 {h + 1:02d}:00", "2.08", org="o-free",
               customer="c-free")
    report = investigate(db_url, "i-f", ["2026-10"])
    assert report.result.findings == []  # no continuous, daily or idle limit; tier matches


def test_default_periods_are_current_and_previous():
    assert default_periods(datetime(2026, 1, 15, tzinfo=timezone.utc)) == ["2025-12", "2026-01"]
    assert default_periods(datetime(2026, 11, 24, tzinfo=timezone.utc)) == ["2026-10", "2026-11"]


def test_unknown_instance_is_an_input_error(db, db_url):
    with pytest.raises(UnknownInstance, match="unknown instance 'i-ghost'"):
        investigate(db_url, "i-ghost")


def test_instance_known_only_from_its_records(db, db_url):
    record(db, 1, "i-orphan", "2026-10-05 08:00", "2026-10-05 09:00", "2.08")
    record(db, 2, "i-orphan", "2026-10-05 08:00", "2026-10-05 09:00", "2.08")
    report = investigate(db_url, "i-orphan", ["2026-10"])
    assert report.result.instance.org_id == "o-acme"
    assert {f.kind for f in report.result.findings} == {"duplicate_charge"}


def test_pure_daily_sweep_handles_unmerged_input():
    from handlers.model import OrgInterval
    from .builders import t
    ivs = [OrgInterval("a", 1, t("10-05 00:00"), t("10-05 02:00")), OrgInterval("a", 2, t("10-05 01:00"), t("10-05 03:00")),
           OrgInterval("b", 3, t("10-05 00:00"), t("10-05 01:00"))]
    unions = instance_unions_by_day(ivs)
    day = t("10-05 00:00")
    assert limit_reached_at(unions[day], day, 3 * 3600 * 10**6) == t("10-05 02:00")
    assert limit_reached_at(unions[day], day, 5 * 3600 * 10**6) is None
