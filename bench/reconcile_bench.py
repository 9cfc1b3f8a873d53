"""Benchmark of `billing-bot reconcile` (issue: daily reconciliation).

    .venv/bin/python -m bench.reconcile_bench [--records 5000000] [--data DIR] [--cluster-by-time]

Generates 5,000,000 billing records over 60 days for 20,000 instances (COPY), adds the indexes
the bot asks the platform team for, then reconciles one day in the middle of the range. In one
run and on one connection it times, alternately, a bare `SELECT count(*), sum(total_charge)` over
the day's rows and the reconciliation itself (`services.reconcile.reconcile_day`: the statement,
fetching and rounding); the ratio of the best of each is the figure the goal speaks of. Beside
them it times the floors any statement that finds overlaps must pay (the day sorted by instance;
with one window pass; with two) and, for scale, a hash sum per instance. It then runs the real CLI
process three times for the wall time and peak RSS a cron job sees.
Goals: under 20 s, under 200 MB peak RSS, at most 3 x the bare query.
The synthetic orgs bill about 80 h a day against the default 24 h daily limit, so every org
crosses it: the daily-limit sweep runs on all 2,000 orgs (a worst case, not a typical day).
The COPY writes instance by instance, so a day's rows are spread over the whole table; a table
only ever appended to keeps them together, which makes the bare query about 4x faster and
nothing else much faster. `--cluster-by-time` rewrites the table that way (the heap order is
printed with the figures).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import psycopg

from bench.common import COPY_RECORDS, fresh_database

START = datetime(2026, 9, 1, tzinfo=timezone.utc)
DAYS = 60
INSTANCES = 20_000
TIERS = [("small", "0.083"), ("medium", "0.167"), ("large", "0.333"), ("gpu", "2.08")]
# the goal's yardstick, with the predicate the reconciliation uses for the day's rows
BARE_SQL = ("SELECT count(*), sum(total_charge) FROM billing_records"
            " WHERE tstzrange(start_time, end_time) && tstzrange(%(lo)s, %(hi)s)")


def generate(url: str, total: int) -> None:
    rng = random.Random(7)
    per_instance = total // INSTANCES
    t0 = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        with conn.cursor() as cur:
            with cur.copy("COPY instances FROM STDIN") as cp:
                for i in range(INSTANCES):
                    tier = TIERS[i % 4][0]
                    status = "stopped" if i % 50 == 0 else "running"
                    stopped = (START + timedelta(days=30)).isoformat() if status == "stopped" else None
                    hb = (START + timedelta(days=DAYS - (3 if i % 40 == 0 else 0))).isoformat()
                    cp.write_row((f"i-{i:05d}", f"o-{i // 10:04d}", f"c-{i // 10:04d}", tier, status,
                                  START.isoformat(), START.isoformat(), stopped, hb))
            rid = 1
            with cur.copy(COPY_RECORDS) as cp:  # lines written by hand: write_row is slow for 5,000,000
                step = DAYS * 24 * 3600 / per_instance
                for i in range(INSTANCES):
                    tier, rate = TIERS[i % 4]
                    org, cust = f"o-{i // 10:04d}", f"c-{i // 10:04d}"
                    for k in range(per_instance):
                        s = START + timedelta(seconds=int(k * step) + rng.randrange(0, 600))
                        secs = rng.choice((3600, 3600, 7200, 10800))
                        e = s + timedelta(seconds=secs)
                        r = rate if rng.random() > 0.001 else "2.08"
                        hours = secs / 3600
                        total = f"{float(r) * hours:.4f}"
                        cp.write(f"{rid}\t{cust}\t{org}\t{f'i-{i:05d}'}\t{tier}\t{r}\t{hours:.4f}\t{total}\t"
                                 f"{s:%Y-%m}\t{s.isoformat()}\t{e.isoformat()}\t{e.isoformat()}\n")
                        rid += 1
        print(f"COPY of {rid - 1:,} records: {time.perf_counter() - t0:.0f} s", flush=True)
        t0 = time.perf_counter()
        conn.execute("CREATE INDEX IF NOT EXISTS billing_records_time_idx ON billing_records (start_time, end_time)")
        conn.execute("ANALYZE")
        print(f"indexes and ANALYZE: {time.perf_counter() - t0:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=5_000_000)
    ap.add_argument("--data", help="keep the generated database in this folder and reuse it next time")
    ap.add_argument("--cluster-by-time", action="store_true",
                    help="first rewrite billing_records in start_time order, as a table that is only ever appended"
                         " to is laid out (kept in --data: later runs measure that layout too)")
    args = ap.parse_args()
    server, url = fresh_database(args.data)
    with psycopg.connect(url) as conn:
        have = conn.execute("SELECT count(*) FROM instances").fetchone()[0]
    if not have:
        generate(url, args.records)
    if args.cluster_by_time:
        cluster_by_time(url)
    day = (START + timedelta(days=30)).date()
    lo = datetime.combine(day, datetime.min.time(), timezone.utc)
    with psycopg.connect(url) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        conn.execute("CREATE INDEX IF NOT EXISTS billing_records_span_idx ON billing_records"
                     " USING gist (tstzrange(start_time, end_time))")
        conn.commit()
        bare = []
        for _ in range(3):
            t0 = time.perf_counter()
            n, total = conn.execute(BARE_SQL, {"lo": lo, "hi": lo + timedelta(days=1)}).fetchone()
            bare.append(time.perf_counter() - t0)
        btree = []
        for _ in range(3):  # and the plain comparison most people would write
            t0 = time.perf_counter()
            conn.execute("SELECT count(*), sum(total_charge) FROM billing_records WHERE start_time < %s"
                         " AND end_time > %s", (lo + timedelta(days=1), lo)).fetchone()
            btree.append(time.perf_counter() - t0)
    add_usage(url, day)
    inproc = asyncio.run(time_in_process(url, day))
    env = dict(os.environ, DATABASE_URL=url)
    runs = []
    out = ""
    for _ in range(3):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "bot.cli", "reconcile", "--date", day.isoformat(), "--json"],
                              env=env, capture_output=True, text=True)
        runs.append(time.perf_counter() - t0)
        if proc.returncode:
            print(proc.stderr)
            raise SystemExit(1)
        out = proc.stdout
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    totals = json.loads(out)["totals"]
    bare2, rec = inproc["bare"], inproc["reconcile"]
    print(f"day {day}: {n:,} records overlap it (sum ${total}); heap order: {heap_order(url)}")
    print(f"bare count/sum with the plain start/end comparison: {', '.join(f'{x:.3f}' for x in btree)} s")
    print(f"bare count/sum (GiST &&): {', '.join(f'{x:.3f}' for x in bare + bare2)} s")
    print(f"reconcile_day on the same connection, alternating with the bare query: {', '.join(f'{x:.3f}' for x in rec)} s;"
          f" ratio best/best {min(rec) / min(bare2):.1f}x (goal 3x)")
    for name, _sql, what in YARDSTICKS[1:]:
        print(f"{what}: {', '.join(f'{x:.3f}' for x in inproc[name])} s; best/best {min(inproc[name]) / min(bare2):.1f}x")
    print(f"reconcile CLI process (start-up, connect, statement, output): {', '.join(f'{x:.2f}' for x in runs)} s;"
          f" peak RSS {rss_mb:.0f} MB")
    print("totals:", totals)


def cluster_by_time(url: str) -> None:
    """Rewrite the table in start_time order. generate() writes instance by instance, so the measured
    day's rows sit on 20,000 pages; rewritten, as records appended when billed would, on 1,429."""
    t0 = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '1GB'")
        conn.execute("CLUSTER billing_records USING billing_records_time_idx")
        conn.execute("VACUUM ANALYZE billing_records")
    print(f"billing_records rewritten in start_time order: {time.perf_counter() - t0:.0f} s", flush=True)


def heap_order(url: str) -> str:
    """How closely the table's physical order follows start_time: the planner's own statistic, from
    the ANALYZE that generate() or cluster_by_time() ran."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT correlation FROM pg_stats WHERE tablename = 'billing_records'"
                           " AND attname = 'start_time'").fetchone()
    corr = row[0] if row else 0.0
    return f"start_time correlation {corr:.2f} ({'time-ordered' if abs(corr) > 0.9 else 'not time-ordered'})"


def add_usage(url: str, day) -> None:
    """instance_usage for the measured day: the billed hours, off by 2 h for one instance in 100
    (a data set with no usage at all would make every instance a usage anomaly)."""
    with psycopg.connect(url, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM instance_usage WHERE date = %s LIMIT 1", (day,)).fetchone():
            return
        conn.execute("SET TIME ZONE 'UTC'")
        conn.execute("""
            INSERT INTO instance_usage (org_id, instance_id, date, hours_used)
            SELECT org_id, instance_id, %(d)s::date,
                   sum(extract(epoch FROM least(end_time, %(d)s::date + 1) - greatest(start_time, %(d)s::date)) / 3600)
                   + CASE WHEN hashtext(instance_id) %% 100 = 0 THEN 2 ELSE 0 END
            FROM billing_records
            WHERE tstzrange(start_time, end_time) && tstzrange(%(d)s::date, %(d)s::date + 1)
            GROUP BY org_id, instance_id""", {"d": day})
        conn.execute("ANALYZE instance_usage")


# What any statement must do before it can find overlaps and continuous runs: read the day's rows
# and the look-back, sort them by instance, and pass a window over that order (once for the
# neighbours, twice for where each run starts). Timed beside the bare query, these show how much of
# the 3x the ordering alone takes (docs/decisions.md, "The reconciliation's 3x goal"). HASH_BY_INSTANCE
# is the cheapest grouping there is, for scale: it finds nothing that needs order.
HASH_BY_INSTANCE = """
SELECT count(*), sum(c) FROM (
  SELECT instance_id, sum(total_charge) AS c FROM billing_records
  WHERE tstzrange(start_time, end_time) && tstzrange(%(lo)s, %(hi)s)
  GROUP BY instance_id) x"""
FLOOR_SORT = """
SELECT count(*), max(id) FROM (
  SELECT instance_id, start_time, end_time, id FROM billing_records
  WHERE tstzrange(start_time, end_time) && tstzrange(%(lo)s - %(back)s::interval, %(hi)s)
  ORDER BY instance_id COLLATE "C", start_time, end_time, id OFFSET 0) x"""
FLOOR_ONE_WINDOW = """
SELECT count(*), count(prev_end), count(next_start) FROM (
  SELECT max(end_time) OVER w AS prev_end, lead(start_time) OVER w AS next_start
  FROM billing_records
  WHERE tstzrange(start_time, end_time) && tstzrange(%(lo)s - %(back)s::interval, %(hi)s)
  WINDOW w AS (PARTITION BY instance_id COLLATE "C" ORDER BY start_time, end_time, id
               ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)) x"""
FLOOR_TWO_WINDOWS = """
SELECT count(*), count(run_start) FROM (
  SELECT max(CASE WHEN prev_end IS NULL OR start_time - prev_end > interval '60 seconds' THEN start_time END)
           OVER (PARTITION BY instance_id COLLATE "C" ORDER BY start_time, end_time, id ROWS UNBOUNDED PRECEDING) AS run_start
  FROM (SELECT instance_id, id, start_time, end_time, max(end_time) OVER w AS prev_end
        FROM billing_records
        WHERE tstzrange(start_time, end_time) && tstzrange(%(lo)s - %(back)s::interval, %(hi)s)
        WINDOW w AS (PARTITION BY instance_id COLLATE "C" ORDER BY start_time, end_time, id
                     ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)) x) y"""

# timed in turn with the reconciliation: (name, statement, how the figures are labelled)
YARDSTICKS = (
    ("bare", BARE_SQL, "bare count/sum"),
    ("hash", HASH_BY_INSTANCE, "for scale, the day's rows summed per instance with a hash (no order)"),
    ("sort", FLOOR_SORT, "floor, scan + sort by instance"),
    ("floor1", FLOOR_ONE_WINDOW, "floor, scan + sort by instance + one window"),
    ("floor2", FLOOR_TWO_WINDOWS, "floor, the same + a second window (run starts)"),
)


async def time_in_process(url: str, day) -> dict[str, list[float]]:
    """Best-of-four timings, taken in turn on one connection: the bare query, the hash yardstick, the
    three floors and reconcile_day itself (statement, fetch and rounding)."""
    from services.config import parse_config
    from services.reconcile import RECONCILE_WORK_MEM, reconcile_day

    lo = datetime.combine(day, datetime.min.time(), timezone.utc)
    config = parse_config({})
    p = {"lo": lo, "hi": lo + timedelta(days=1), "back": config.throttle_defaults.continuous_limit + timedelta(seconds=60)}
    times: dict[str, list[float]] = {name: [] for name, _sql, _what in YARDSTICKS} | {"reconcile": []}
    async with await psycopg.AsyncConnection.connect(url) as conn:
        await conn.execute("SET TIME ZONE 'UTC'")
        for _ in range(4):
            for name, sql, _what in YARDSTICKS:
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL work_mem = '{RECONCILE_WORK_MEM}'")
                    t0 = time.perf_counter()
                    await (await conn.execute(sql, p)).fetchone()
                    times[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            async with conn.transaction():
                await reconcile_day(conn, day, config)
            times["reconcile"].append(time.perf_counter() - t0)
    return times


if __name__ == "__main__":
    main()
