"""A/B of the reconciliation against an earlier revision's statement, on one day of a kept data set.

    .venv/bin/python -m bench.statement_ab --data /tmp/recon-bench/storm --date 2026-10-13 [--rev main] [--rounds 2]

In turn on one connection: the revision's services/sql/reconcile.sql run as that revision's
reconcile_day ran it (one statement, work_mem 64MB), then this tree's reconcile_day. Prints the
medians, the ratio and the anomaly counts (they must agree). The days are bench.storm_bench's.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import time
from datetime import date

import psycopg

from bench.common import fresh_database


async def measure(url: str, day: date, old_sql: str, rounds: int) -> None:
    from services import reconcile
    from services.config import parse_config

    config = parse_config({})
    params = {k: v for k, v in reconcile._params(day, config).items() if not k.startswith("shard")}
    times: dict[str, list[float]] = {"old": [], "new": []}
    counts: dict[str, int] = {}
    async with await psycopg.AsyncConnection.connect(url) as conn:
        await conn.execute("SET TIME ZONE 'UTC'")
        await conn.commit()
        for _ in range(rounds):
            async with conn.transaction():
                await conn.execute("SET LOCAL work_mem = '64MB'")
                await conn.execute("SET LOCAL statement_timeout = 3600000")
                t0 = time.perf_counter()
                rows = await (await conn.execute(old_sql, params, prepare=False)).fetchall()
                times["old"].append(time.perf_counter() - t0)
                counts["old"] = len(rows)
            async with conn.transaction():
                t0 = time.perf_counter()
                rec = await reconcile.reconcile_day(conn, day, config)
                times["new"].append(time.perf_counter() - t0)
                counts["new"] = len(rec.anomalies)
    for k, label in (("old", "old statement"), ("new", "reconcile_day")):
        print(f"{day} {label}: median {statistics.median(times[k]):.2f} s "
              f"({', '.join(f'{x:.2f}' for x in times[k])}); {counts[k]:,} anomalies")
    print(f"new/old {statistics.median(times['new']) / statistics.median(times['old']):.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--date", required=True)
    ap.add_argument("--rev", default="main")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    old_sql = subprocess.run(["git", "show", f"{args.rev}:services/sql/reconcile.sql"], capture_output=True,
                             text=True, check=True).stdout
    _server, url = fresh_database(args.data)
    asyncio.run(measure(url, date.fromisoformat(args.date), old_sql, args.rounds))


if __name__ == "__main__":
    main()
