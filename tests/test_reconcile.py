"""Daily reconciliation (SPEC 5.2) on real PostgreSQL: each anomaly kind, amounts in the day only."""
import asyncio
import json
import subprocess
import sys
from datetime import date


from services.config import parse_config
from services.db import Database
from services.reconcile import reconcile_day
from services.store import Store

from .seed import instance, record, throttle

FRESH = "2026-10-05 23:59"


def fill_usage(db, day, except_ids=()):
    """instance_usage agreeing with the billed hours of every instance, except the ones named."""
    db.execute("""
        INSERT INTO instance_usage (org_id, instance_id, date, hours_used)
        SELECT org_id, instance_id, %(d)s::date,
               sum(extract(epoch FROM least(end_time, %(d)s::date + 1) - greatest(start_time, %(d)s::date)) / 3600)
        FROM billing_records WHERE start_time < %(d)s::date + 1 AND end_time > %(d)s::date
          AND NOT (instance_id = ANY(%(x)s))
        GROUP BY org_id, instance_id""", {"d": day, "x": list(except_ids)})


def run(db_url, day, config=None):
    async def go():
        db = await Database.connect(db_url)
        try:
            async with db.snapshot() as conn:
                return await reconcile_day(conn, day, config or parse_config({}))
        finally:
            await db.close()
    return asyncio.run(go())


def seed_all_kinds(db):
    instance(db, "i-rate", org="o-r", customer="c-r", tier="small", heartbeat=FRESH)
    record(db, 1, "i-rate", "2026-10-05 10:00", "2026-10-05 12:00", "0.2", tier="small", rate="0.1", org="o-r", customer="c-r")
    instance(db, "i-chg", org="o-c", customer="c-c", tier="gpu", heartbeat=FRESH)
    db.execute("INSERT INTO billing_records VALUES (2,'c-c','o-c','i-chg','gpu',2.08,2,4.16,'2026-10',"
               "'2026-10-05 10:00Z','2026-10-05 11:00Z',now())")
    instance(db, "i-dup", org="o-u", customer="c-u", heartbeat=FRESH)
    record(db, 3, "i-dup", "2026-10-05 08:00", "2026-10-05 09:00", "2.08", org="o-u", customer="c-u")
    record(db, 4, "i-dup", "2026-10-05 08:00", "2026-10-05 09:00", "2.08", org="o-u", customer="c-u")
    instance(db, "i-ovl", org="o-o", customer="c-o", tier="medium", heartbeat=FRESH)
    record(db, 5, "i-ovl", "2026-10-05 08:00", "2026-10-05 10:00", "0.334", tier="medium", rate="0.167", org="o-o", customer="c-o")
    record(db, 6, "i-ovl", "2026-10-05 09:00", "2026-10-05 11:00", "0.334", tier="medium", rate="0.167", org="o-o", customer="c-o")
    instance(db, "i-stop", org="o-s", customer="c-s", status="stopped", stopped_at="2026-10-05 12:00")
    record(db, 7, "i-stop", "2026-10-05 10:00", "2026-10-05 14:00", "8.32", org="o-s", customer="c-s")
    instance(db, "i-idle", org="o-i", customer="c-i", tier="small", heartbeat="2026-10-05 09:00")
    record(db, 8, "i-idle", "2026-10-05 09:00", "2026-10-05 11:00", "0.166", tier="small", rate="0.083", org="o-i", customer="c-i")
    instance(db, "i-cont", org="o-k", customer="c-k", tier="large", heartbeat=FRESH)
    for n, h in enumerate(range(20, 34)):  # 2026-10-04 20:00 to 2026-10-05 10:00, hourly
        s, e = divmod(h, 24), divmod(h + 1, 24)
        record(db, 100 + n, "i-cont", f"2026-10-0{4 + s[0]} {s[1]:02d}:00", f"2026-10-0{4 + e[0]} {e[1]:02d}:00",
               "0.333", tier="large", rate="0.333", org="o-k", customer="c-k")
    throttle(db, "o-d", None, "10 hours", None)
    for k, iid in enumerate(["i-d1", "i-d2"]):
        instance(db, iid, org="o-d", customer="c-d", heartbeat=FRESH)
        record(db, 200 + k, iid, "2026-10-05 00:00", "2026-10-05 06:00", "12.48", org="o-d", customer="c-d")
    instance(db, "i-use", org="o-x", customer="c-x", tier="small", heartbeat=FRESH)
    record(db, 300, "i-use", "2026-10-05 09:00", "2026-10-05 12:00", "0.249", tier="small", rate="0.083", org="o-x", customer="c-x")
    db.execute("INSERT INTO instance_usage VALUES ('o-x', 'i-use', '2026-10-05', 1)")
    fill_usage(db, "2026-10-05", except_ids=["i-use"])


def test_every_anomaly_kind_with_its_overcharge(db, db_url):
    seed_all_kinds(db)
    rec = run(db_url, date(2026, 10, 5))
    got = {(a.kind, a.instance_id or a.org_id): (a.overcharge_cents, a.record_ids) for a in rec.anomalies}
    assert got == {
        ("daily_limit", "o-d"): (416, [200, 201]),          # T 05:00, 05:00-06:00 on both: 2 x $2.08
        ("continuous_limit", "i-cont"): (200, [108, 109, 110, 111, 112, 113]),  # run from 10-04 20:00; 04:00-10:00
        ("rate_mismatch", "i-rate"): (3, [1]),               # 0.20 - 2 x 0.083
        ("charge_mismatch", "i-chg"): (0, [2]),
        ("duplicate", "i-dup"): (208, [3, 4]),
        ("overlap", "i-ovl"): (17, [5, 6]),                  # 1 h of medium
        ("billed_after_stop", "i-stop"): (416, [7]),         # 12:00-14:00 gpu
        ("billed_while_idle", "i-idle"): (12, [8]),          # 09:30-11:00 small: 0.1245
        ("usage_mismatch", "i-use"): (0, [300]),
    }
    daily = next(a for a in rec.anomalies if a.kind == "daily_limit")
    assert daily.instance_id is None and daily.customer_id == "c-d"
    assert "05:00:00" in daily.detail
    totals = rec.totals()
    assert totals["duplicate"] == {"count": 1, "overcharge_cents": 208}
    assert sum(t["count"] for t in totals.values()) == len(rec.anomalies) == 9


def test_a_clean_day_has_no_anomalies(db, db_url):
    instance(db, "i-ok", tier="small", heartbeat=FRESH)
    record(db, 1, "i-ok", "2026-10-05 09:00", "2026-10-05 12:00", "0.249", tier="small", rate="0.083")
    fill_usage(db, "2026-10-05")
    assert run(db_url, date(2026, 10, 5)).anomalies == []


def test_month_boundary_and_a_record_crossing_midnight(db, db_url):
    instance(db, "i-mid", heartbeat="2026-10-02 00:00")
    record(db, 1, "i-mid", "2026-09-30 22:00", "2026-10-01 02:00", "8.32", period="2026-09")
    record(db, 2, "i-mid", "2026-09-30 22:00", "2026-10-01 02:00", "8.32", period="2026-09")
    fill_usage(db, "2026-10-01")
    fill_usage(db, "2026-09-30")
    oct1 = run(db_url, date(2026, 10, 1))
    assert [(a.kind, a.overcharge_cents) for a in oct1.anomalies] == [("duplicate", 416)]  # 00:00-02:00 only
    sep30 = run(db_url, date(2026, 9, 30))
    assert [(a.kind, a.overcharge_cents) for a in sep30.anomalies] == [("duplicate", 416)]  # 22:00-24:00


def test_counts_feed_the_systematic_rule_of_the_check(db, db_url):
    for i in range(3):
        instance(db, f"i-s{i}", org=f"o-s{i}", customer=f"c-s{i}", heartbeat=FRESH)
        record(db, 10 * i + 1, f"i-s{i}", "2026-10-05 08:00", "2026-10-05 09:00", "2.08", org=f"o-s{i}", customer=f"c-s{i}")
        record(db, 10 * i + 2, f"i-s{i}", "2026-10-05 08:00", "2026-10-05 09:00", "2.08", org=f"o-s{i}", customer=f"c-s{i}")
    fill_usage(db, "2026-10-05")

    async def go():
        dbx = await Database.connect(db_url)
        try:
            async with dbx.snapshot() as conn:
                rec = await reconcile_day(conn, date(2026, 10, 5), parse_config({}))
            await Store(dbx).record_reconciliation(rec)
            from services.investigation import Investigator
            return await Investigator(parse_config({}), dbx).check("i-s0", ["2026-10"])
        finally:
            await dbx.close()
    report = asyncio.run(go())
    assert report.result.systematic
    assert "duplicate_charge for 3 customers" in report.result.systematic_reasons[0]


def test_reconcile_cli_json_and_bad_date(db, db_url, bot_env):
    seed_all_kinds(db)
    proc = subprocess.run([sys.executable, "-m", "bot.cli", "reconcile", "--date", "2026-10-05", "--json"],
                          env=bot_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["date"] == "2026-10-05" and len(out["anomalies"]) == 9
    assert set(out["anomalies"][0]) == {"kind", "instance_id", "org_id", "customer_id", "record_ids",
                                        "overcharge_cents", "detail"}
    assert out["totals"]["daily_limit"] == {"count": 1, "overcharge_cents": 416}
    bad = subprocess.run([sys.executable, "-m", "bot.cli", "reconcile", "--date", "2026-02-30"], env=bot_env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "malformed date '2026-02-30'" in bad.stderr


def test_a_run_that_began_just_before_the_look_back(db, db_url):
    """The look-back reaches the continuous limit plus the 60 s gap before the day: a record ending
    exactly 8 h before midnight still joins the run of one starting 60 s later."""
    instance(db, "i-long", heartbeat=FRESH)
    record(db, 1, "i-long", "2026-10-04 10:00", "2026-10-04 16:00", "12.48")
    record(db, 2, "i-long", "2026-10-04 16:01", "2026-10-05 01:00", "18.6853")  # 8 h 59 min of gpu
    fill_usage(db, "2026-10-05")
    rec = run(db_url, date(2026, 10, 5))
    # the run began at 10:00 the day before, so all of 00:00-01:00 is past the limit: 18.6853 x 60/539
    assert [(a.kind, a.instance_id, a.overcharge_cents) for a in rec.anomalies] == [("continuous_limit", "i-long", 208)]


def test_the_daily_limit_reached_on_and_between_hour_boundaries(db, db_url):
    """The statement sums the org's events per hour, then sweeps event by event only inside the hour
    that passes the limit, or solves the straight stretch after it. Each org here pins one case; the
    detail names the moment to the second."""
    orgs = {  # org: (daily limit, [(start, end, charge)]) on 2026-10-05, gpu at $2.08/h
        "o-a": ("2 hours", [("00:00", "01:00", "2.08"), ("00:30", "03:00", "5.20")]),    # an end exactly at 01:00
        "o-b": ("1 hour", [("00:00", "05:00", "10.40")]),                                # reached exactly at 01:00
        "o-c": ("1 hour", [("00:00", "01:00", "2.08"), ("02:00", "04:00", "4.16")]),     # flat from 01:00 to 02:00
        "o-e": ("1 hour", [("00:00", "00:40", "1.3867"), ("00:30", "00:50", "0.6933"),
                           ("00:45", "01:30", "1.56")]),                                 # inside hour 0, mid-event
    }
    rid = 1
    for org, (limit, spans) in orgs.items():
        throttle(db, org, None, limit, None)
        for k, (s, e, charge) in enumerate(spans):
            instance(db, f"i-{org}-{k}", org=org, customer=f"c-{org}", heartbeat=FRESH)
            record(db, rid, f"i-{org}-{k}", f"2026-10-05 {s}", f"2026-10-05 {e}", charge, org=org, customer=f"c-{org}")
            rid += 1
    fill_usage(db, "2026-10-05")
    rec = run(db_url, date(2026, 10, 5))
    got = {a.org_id: (a.overcharge_cents, a.record_ids, a.detail.rsplit(" at ", 1)[1]) for a in rec.anomalies}
    assert {a.kind for a in rec.anomalies} == {"daily_limit"}
    assert got == {
        "o-a": (312, [2], "2026-10-05 01:30:00"),           # 5.20 x 1.5 h / 2.5 h
        "o-b": (832, [3], "2026-10-05 01:00:00"),           # 10.40 x 4 h / 5 h
        "o-c": (416, [5], "2026-10-05 02:00:00"),           # the whole second record
        "o-e": (156, [7, 8], "2026-10-05 00:47:30"),        # 0.6933 x 2.5/20 + 1.56 x 42.5/45
    }
