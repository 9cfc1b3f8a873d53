"""The usage audit's anomalies per customer (issue 16): the daily reconciliation stores, per run,
customer and kind, its count and overcharge; the month's report sums each day's latest whole-day run
(one process, or the merge of all shards), never a lone shard's row, never another month's day."""
import json
import os
import subprocess
import sys
from decimal import Decimal

import psycopg

from .seed import instance, record
from .test_reconcile import fill_usage, seed_all_kinds

# SPEC 5.2's arithmetic on tests/test_reconcile.seed_all_kinds's 2026-10-05, worked out by hand there
# (test_every_anomaly_kind_with_its_overcharge): one anomaly per customer
OCT_05 = {"c-d": ("daily_limit", 416), "c-k": ("continuous_limit", 200), "c-r": ("rate_mismatch", 3),
          "c-c": ("charge_mismatch", 0), "c-u": ("duplicate", 208), "c-o": ("overlap", 17),
          "c-s": ("billed_after_stop", 416), "c-i": ("billed_while_idle", 12), "c-x": ("usage_mismatch", 0)}


def env_for(db_url):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLACK_", "POLAR_", "KUBE", "SMTP"))}
    env.pop("BILLING_BOT_CONFIG", None)
    env["DATABASE_URL"] = db_url
    return env


def cli(env, *args):
    proc = subprocess.run([sys.executable, "-m", "bot.cli", *args], env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, (args, proc.stderr)
    return proc.stdout


def test_the_months_anomalies_per_customer_are_each_days_latest_whole_run(db, db_url):
    env = env_for(db_url)
    seed_all_kinds(db)
    # 10-05 first reconciled with a third copy of c-u's duplicated hour, which is then taken away
    # and the day reconciled again in three shards: only that merged run counts for 10-05
    record(db, 9, "i-dup", "2026-10-05 08:00", "2026-10-05 09:00", "2.08", org="o-u", customer="c-u")
    cli(env, "reconcile", "--date", "2026-10-05")
    db.execute("DELETE FROM billing_records WHERE id = 9")
    for k in range(3):
        cli(env, "reconcile", "--date", "2026-10-05", "--shard", f"{k}/3", "--run", "again")
    # 10-06: c-u billed twice for another hour on another instance
    instance(db, "i-dup2", org="o-u", customer="c-u", heartbeat="2026-10-06 23:59")
    record(db, 400, "i-dup2", "2026-10-06 08:00", "2026-10-06 09:00", "2.08", org="o-u", customer="c-u")
    record(db, 401, "i-dup2", "2026-10-06 08:00", "2026-10-06 09:00", "2.08", org="o-u", customer="c-u")
    instance(db, "i-ok", org="o-ok", customer="c-ok", heartbeat="2026-10-06 23:59")  # billed right
    record(db, 402, "i-ok", "2026-10-06 08:00", "2026-10-06 09:00", "2.08", org="o-ok", customer="c-ok")
    fill_usage(db, "2026-10-06")
    cli(env, "reconcile", "--date", "2026-10-06")
    # 10-07: one shard of two only (its merge never happened): not a whole day, not counted
    instance(db, "i-dup3", org="o-u", customer="c-u", heartbeat="2026-11-01 23:59")
    for rid in (500, 501):
        record(db, rid, "i-dup3", "2026-10-07 08:00", "2026-10-07 09:00", "2.08", org="o-u", customer="c-u")
    fill_usage(db, "2026-10-07")
    (k,) = db.execute("SELECT (hashtext('o-u')::bigint & 2147483647) % 2").fetchone()  # o-u's shard, alone
    out = cli(env, "reconcile", "--date", "2026-10-07", "--shard", f"{k}/2", "--run", "lonely", "--json")
    assert [a["customer_id"] for a in json.loads(out)["anomalies"]] == ["c-u"]
    # November's day is November's, even for an October report's customer
    for rid in (600, 601):
        record(db, rid, "i-dup3", "2026-11-01 08:00", "2026-11-01 09:00", "2.08", org="o-u", customer="c-u")
    fill_usage(db, "2026-11-01")
    cli(env, "reconcile", "--date", "2026-11-01")

    rep = json.loads(cli(env, "report", "--usage", "--month", "2026-10", "--json"))
    assert (rep["reconciled_days"], rep["days_in_month"]) == (2, 31)
    want = {c: {k: {"count": 1, "overcharge_cents": cents}} for c, (k, cents) in OCT_05.items()}
    want["c-u"] = {"duplicate": {"count": 2, "overcharge_cents": 416}}  # 10-05 (the latest run) and 10-06
    got = {c["customer_id"]: c["anomalies"] for c in rep["customers"]}
    assert {c: a for c, a in got.items() if a} == want
    # the charges against the records, and every customer billed in October is listed (fewer than 20)
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT customer_id, sum(total_charge), sum(hours_used) FROM billing_records"
                            " WHERE billing_period = '2026-10' GROUP BY customer_id").fetchall()
    assert set(got) == {r[0] for r in rows}
    by = {c["customer_id"]: c for c in rep["customers"]}
    for cust, charge, hours in rows:
        assert by[cust]["charge_cents"] == int((charge * 100).quantize(Decimal(1), rounding="ROUND_HALF_UP"))
        assert Decimal(by[cust]["hours"]) == hours
    text = cli(env, "report", "--usage", "--month", "2026-10")
    assert "Anomalies from 2 of 31 days reconciled" in text
    assert "anomalies: duplicate 2 ($4.16)" in next(line for line in text.splitlines() if " c-u:" in line)
    assert "anomalies: none" in next(line for line in text.splitlines() if " c-ok:" in line)


def test_each_stored_run_holds_exactly_its_anomalies_per_customer_and_kind(db, db_url):
    """The stored rows are the run's anomalies regrouped: counts and cents add up to the run's totals."""
    env = env_for(db_url)
    seed_all_kinds(db)
    out = json.loads(cli(env, "reconcile", "--date", "2026-10-05", "--json"))
    with psycopg.connect(db_url) as conn:
        (run_id, stored) = conn.execute("SELECT id, customer_kinds_stored FROM billing_bot.reconcile_runs"
                                        " WHERE shard IS NULL ORDER BY id DESC LIMIT 1").fetchone()
        rows = conn.execute("SELECT customer_id, kind, anomalies, overcharge_cents FROM"
                            " billing_bot.reconcile_customer_kinds WHERE run_id = %s", (run_id,)).fetchall()
    assert stored
    per_kind = {}
    for cust, kind, n, cents in rows:
        t = per_kind.setdefault(kind, {"count": 0, "overcharge_cents": 0})
        t["count"] += n
        t["overcharge_cents"] += cents
    assert per_kind == out["totals"]
    assert {(c, k) for c, k, _, _ in rows} == {(a["customer_id"], a["kind"]) for a in out["anomalies"]}


def test_a_month_nobody_reconciled_does_not_read_as_clean(db, db_url):
    record(db, 1, "i-x", "2026-09-03 08:00", "2026-09-03 09:00", "2.08", customer="c-x")
    env = env_for(db_url)
    rep = json.loads(cli(env, "report", "--usage", "--month", "2026-09", "--json"))
    assert rep["reconciled_days"] == 0 and rep["customers"][0]["anomalies"] == {}
    text = cli(env, "report", "--usage", "--month", "2026-09")
    assert "no reconciliation of this month's days is stored, so none can be shown (not: none found)" in text
    assert "anomalies:" not in text
