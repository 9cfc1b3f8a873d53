"""Reconciliation cost by the day's shape and size (issue 15).

    .venv/bin/python -m bench.storm_bench [--data DIR] [--rounds 3]

Days of 20k, 100k and 400k rows where each instance bills back to back, and metering-storm days of
20k, 71k and 355k rows where every record overlaps a shifted copy of itself, in one table. For each
day, in turn (A/B alternating across days, best and median of --rounds): reconcile_day (statement,
fetch, rounding) and its floor, the bare count/sum over the same day's rows; the cost per row on the
day; and the temporary bytes PostgreSQL wrote (a spill) under the documented work_mem. Then the CLI
process on the largest storm day: wall time and peak RSS.
Goals: the 355k storm day under 10 s; the cost per row at 400k within 1.3x of that at 20k; peak RSS
under 200 MB; no spill.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from datetime import date, timedelta

import psycopg

from bench.common import fresh_database
from bench.day_shapes import day_start, ensure_days

SHAPES = {  # day: (rows on the day, storm, instance tag)
    date(2026, 10, 1): (20_000, False, "p"),
    date(2026, 10, 4): (100_000, False, "q"),
    date(2026, 10, 7): (400_000, False, "r"),
    date(2026, 10, 10): (20_000, True, "s"),
    date(2026, 10, 13): (71_000, True, "t"),
    date(2026, 10, 16): (355_000, True, "u"),
}
BARE = ("SELECT count(*), sum(total_charge) FROM billing_records"
        " WHERE tstzrange(start_time, end_time) && tstzrange(%(lo)s, %(hi)s)")


async def measure(url: str, rounds: int) -> dict:
    from services.config import parse_config
    from services.reconcile import RECONCILE_WORK_MEM, reconcile_day

    config = parse_config({})
    out = {day: {"bare": [], "rec": [], "temp": [], "rows": 0, "anomalies": 0} for day in SHAPES}
    async with await psycopg.AsyncConnection.connect(url) as conn:
        await conn.execute("SET TIME ZONE 'UTC'")
        await conn.commit()
        for _ in range(rounds):
            for day in SHAPES:
                lo = day_start(day)
                p = {"lo": lo, "hi": lo + timedelta(days=1)}
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL work_mem = '{RECONCILE_WORK_MEM}'")
                    t0 = time.perf_counter()
                    n, _ = await (await conn.execute(BARE, p)).fetchone()
                    out[day]["bare"].append(time.perf_counter() - t0)
                out[day]["rows"] = n
                temp0 = await temp_bytes(conn)
                t0 = time.perf_counter()
                async with conn.transaction():
                    rec = await reconcile_day(conn, day, config)
                out[day]["rec"].append(time.perf_counter() - t0)
                out[day]["temp"].append(await temp_bytes(conn) - temp0)
                out[day]["anomalies"] = len(rec.anomalies)
    return out


async def temp_bytes(conn) -> int:
    # the statistics are sent at the end of each transaction; ask for a fresh snapshot of them
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    row = await (await conn.execute("SELECT temp_bytes FROM pg_stat_database WHERE datname = current_database()"
                                    )).fetchone()
    await conn.commit()
    return int(row[0])


def cli(url: str, day: date) -> tuple[float, float]:
    """Wall time and peak RSS (MB) of one `reconcile --json` process, from its own rusage."""
    env = dict(os.environ, DATABASE_URL=url)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bot.cli", "reconcile", "--date", day.isoformat(), "--json"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status:
        raise SystemExit(proc.stderr.read().decode())
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", help="keep the generated database in this folder and reuse it")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    _server, url = fresh_database(args.data)
    ensure_days(url, SHAPES)
    res = asyncio.run(measure(url, args.rounds))
    per_row = {}
    for day, (_rows, storm, _tag) in SHAPES.items():
        r = res[day]
        med = statistics.median(r["rec"])
        per_row[day] = med / r["rows"] * 1e6
        print(f"{'storm' if storm else 'plain'} day of {r['rows']:>7,} rows: reconcile_day median {med:.3f} s "
              f"(best {min(r['rec']):.3f}; {per_row[day]:.2f} us/row; {r['anomalies']:,} anomalies); bare count/sum "
              f"median {statistics.median(r['bare']):.3f} s; ratio to the bare query {med / statistics.median(r['bare']):.1f}x;"
              f" temp bytes written {max(r['temp']):,}", flush=True)
    days = list(SHAPES)
    print(f"cost per row, 400k plain / 20k plain: {per_row[days[2]] / per_row[days[0]]:.2f}x (goal <= 1.3x); "
          f"355k storm / 20k storm: {per_row[days[5]] / per_row[days[3]]:.2f}x; "
          f"355k storm / 20k plain: {per_row[days[5]] / per_row[days[0]]:.2f}x")
    for day in (days[5], days[2]):
        walls, rss = [], []
        for _ in range(args.rounds):
            wall, peak = cli(url, day)
            walls.append(wall)
            rss.append(peak)
        print(f"CLI process `reconcile --date {day} --json` ({res[day]['rows']:,} rows): median "
              f"{statistics.median(walls):.2f} s ({', '.join(f'{w:.2f}' for w in walls)}); peak RSS {max(rss):.0f} MB"
              f" (goal < 200 MB)", flush=True)


if __name__ == "__main__":
    main()
