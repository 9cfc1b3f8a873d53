"""reconcile --shard K/N against one process on the same day (issue 15).

    .venv/bin/python -m bench.shard_bench [--data DIR] [--shards 4] [--rounds 3]

Uses the 400k-row plain day of bench.storm_bench (generated if missing, in the same --data folder).
In turn, --rounds times: one `billing-bot reconcile --json` process, then --shards processes of
`reconcile --json --shard K/N --run KEY` started together, timed until the last exits. Prints the
medians, the ratio (goal: at most 0.7x on this 2-core machine), the floor (one process divided by the
cores) and checks that the shards' anomalies are the single process's and that the merged run's
totals stored by the last shard are the same.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from datetime import date

import psycopg

from bench.common import fresh_database
from bench.day_shapes import ensure_days
from bench.storm_bench import SHAPES

DAY = date(2026, 10, 7)


def cli(env, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bot.cli", "reconcile", "--date", DAY.isoformat(), "--json", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs) -> list[dict]:
    outs = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode:
            raise SystemExit(err)
        outs.append(json.loads(out))
    return outs


def key(a: dict) -> tuple:
    return (a["kind"], a["instance_id"] or "", a["org_id"], a["customer_id"], tuple(a["record_ids"]),
            a["overcharge_cents"], a["detail"])


async def serial_work(url: str, shards: int) -> tuple[float, list[float]]:
    """The whole day and each shard reconciled one after another on one connection: the work each
    process has to do, free of the other processes on the machine."""
    from services.config import parse_config
    from services.reconcile import reconcile_day

    async with await psycopg.AsyncConnection.connect(url) as conn:
        await conn.execute("SET TIME ZONE 'UTC'")
        await conn.commit()
        t0 = time.perf_counter()
        async with conn.transaction():
            await reconcile_day(conn, DAY, parse_config({}))
        whole = time.perf_counter() - t0
        parts = []
        for k in range(shards):
            t0 = time.perf_counter()
            async with conn.transaction():
                await reconcile_day(conn, DAY, parse_config({}), (k, shards))
            parts.append(time.perf_counter() - t0)
    return whole, parts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    _server, url = fresh_database(args.data)
    ensure_days(url, {DAY: SHAPES[DAY]})
    env = dict(os.environ, DATABASE_URL=url)
    one, split = [], []
    whole = parts = None
    run_key = ""
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        (whole,) = finish([cli(env)])
        one.append(time.perf_counter() - t0)
        run_key = f"bench-{uuid.uuid4().hex[:8]}"
        t0 = time.perf_counter()
        parts = finish([cli(env, "--shard", f"{k}/{args.shards}", "--run", run_key) for k in range(args.shards)])
        split.append(time.perf_counter() - t0)
    same = sorted(key(a) for p in parts for a in p["anomalies"]) == sorted(key(a) for a in whole["anomalies"])
    with psycopg.connect(url) as conn:
        merged = conn.execute("SELECT totals FROM billing_bot.reconcile_runs WHERE run_key = %s AND shard IS NULL",
                              (run_key,)).fetchone()
    a, b = statistics.median(one), statistics.median(split)
    print(f"day {DAY}: {len(whole['anomalies']):,} anomalies; one process median {a:.2f} s "
          f"({', '.join(f'{x:.2f}' for x in one)}); {args.shards} shard processes median {b:.2f} s "
          f"({', '.join(f'{x:.2f}' for x in split)}); ratio {b / a:.2f}x (goal <= 0.7x); floor on "
          f"{os.cpu_count()} cores {1 / os.cpu_count():.2f}x, so {b / a * os.cpu_count():.2f}x the floor")
    whole_s, parts_s = asyncio.run(serial_work(url, args.shards))
    cores = os.cpu_count() or 1
    print(f"the same work one after another in one process: whole day {whole_s:.2f} s; shards "
          f"{', '.join(f'{x:.2f}' for x in parts_s)} s (sum {sum(parts_s):.2f} s); on {cores} free cores the split"
          f" would take {max(max(parts_s), sum(parts_s) / cores) / whole_s:.2f}x the whole day"
          f" (the longest shard or the sum over the cores); load average now {os.getloadavg()[0]:.1f}")
    print(f"shards' anomalies identical to the single process: {same}; merged totals identical: "
          f"{merged is not None and merged[0] == whole['totals']}")


if __name__ == "__main__":
    main()
