"""A check costs what its periods hold (issue 15).

    .venv/bin/python -m bench.check_shapes_bench [--data DIR] [--runs 7]

1. An instance with 100,000 records of history (five-minute records, 22 h a day for about a year,
   beside 30 other instances appended in time order), 2,000 of them in the checked period. Goal:
   the check under 100 ms. Floor: a fresh query fetching only the 2,000 checked records.
2. A daily-limit check in an org of 2,000 instances that bill 10 h a day each (the org passes its
   24 h limit every day); the checked instance billed on 7 days of the checked period. Goal: under
   300 ms. Floor: a bare count/sum over the org's rows of those 7 days.
Each check is the real Investigator (database only), median of --runs, alternating with its floor.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from datetime import datetime, timedelta, timezone

import psycopg

from bench.common import COPY_RECORDS, fresh_database

HIST_END = datetime(2026, 11, 8, 13, tzinfo=timezone.utc)  # 2026-11 holds about 2,000 of i-hist's records
NOW = datetime(2026, 11, 20, tzinfo=timezone.utc)
ORG_START = datetime(2026, 10, 1, tzinfo=timezone.utc)
ORG_DAYS = 50
ORG_SIZE = 2_000


def generate(url: str) -> None:
    t0 = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        if conn.execute("SELECT 1 FROM instances WHERE instance_id = 'i-hist'").fetchone():
            return
        rows = []
        # 1. i-hist: five-minute records, 22 h a day (a restart at 00:00-02:00), 100,000 of them back
        # from HIST_END; 30 neighbours billed hourly in between, all written in time order
        t, n = HIST_END, 0
        hist = []
        while n < 100_000:
            t -= timedelta(minutes=5)
            if t.hour < 2:
                continue
            hist.append((t, t + timedelta(minutes=5), "i-hist", "o-hist"))
            n += 1
        first = hist[-1][0]
        other = [(first + timedelta(hours=h), first + timedelta(hours=h + 1), f"i-n{k:02d}", "o-hist")
                 for h in range(int((HIST_END - first).total_seconds() // 3600)) for k in range(30)]
        rows += sorted(hist + other)
        # 2. o-big: 2,000 instances, hourly 10 h a day from a staggered start; i-day, the one checked,
        # bills 10 h on 7 days of 2026-11
        for d in range(ORG_DAYS):
            day = ORG_START + timedelta(days=d)
            for i in range(ORG_SIZE):
                for h in range(8 + i % 5, 18 + i % 5):
                    s = day + timedelta(hours=h)
                    rows.append((s, s + timedelta(hours=1), f"i-b{i:04d}", "o-big"))
        for d in range(7):
            for h in range(9, 19):
                s = datetime(2026, 11, 3 + d, h, tzinfo=timezone.utc)
                rows.append((s, s + timedelta(hours=1), "i-day", "o-big"))
        with conn.cursor() as cur, cur.copy(COPY_RECORDS) as cp:
            for rid, (s, e, iid, org) in enumerate(rows, 1):
                hours = (e - s).total_seconds() / 3600
                cp.write(f"{rid}\tc-{org}\t{org}\t{iid}\tsmall\t0.083\t{hours:.4f}\t{0.083 * hours:.4f}\t"
                         f"{s:%Y-%m}\t{s.isoformat()}\t{e.isoformat()}\t{e.isoformat()}\n")
        for iid, org in (("i-hist", "o-hist"), ("i-day", "o-big")):
            conn.execute("INSERT INTO instances VALUES (%s,%s,%s,'small','running',%s,%s,NULL,%s)",
                         (iid, org, f"c-{org}", ORG_START - timedelta(days=400), ORG_START, NOW))
        # i-hist: continuous limit on (its runs are 22 h); o-big: only the daily limit, so it is judged
        conn.execute("INSERT INTO throttle_settings VALUES ('o-big', NULL, '24 hours', NULL)")
        conn.execute("ANALYZE")
    print(f"generated {len(rows):,} records: {time.perf_counter() - t0:.0f} s", flush=True)


FLOORS = {
    "i-hist": ("SELECT id, start_time, end_time, total_charge FROM billing_records"
               " WHERE instance_id = 'i-hist' AND billing_period = '2026-11'"),
    "i-day": ("SELECT count(*), sum(total_charge) FROM billing_records WHERE org_id = 'o-big'"
              " AND start_time >= '2026-11-03' AND start_time < '2026-11-10'"),
}


async def measure(url: str, runs: int) -> dict:
    from services.config import parse_config
    from services.db import Database
    from services.investigation import Investigator

    db = await Database.connect(url)
    inv = Investigator(parse_config({}), db, now=lambda: NOW)
    out = {k: {"check": [], "floor": [], "report": None} for k in FLOORS}
    try:
        for _ in range(runs):
            for iid, floor_sql in FLOORS.items():
                t0 = time.perf_counter()
                out[iid]["report"] = await inv.check(iid, ["2026-11"])
                out[iid]["check"].append(time.perf_counter() - t0)
                async with db.pool.connection() as conn:
                    t0 = time.perf_counter()
                    await (await conn.execute(floor_sql)).fetchall()
                    out[iid]["floor"].append(time.perf_counter() - t0)
    finally:
        await db.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data")
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    _server, url = fresh_database(args.data)
    generate(url)
    res = asyncio.run(measure(url, args.runs))
    for iid, goal, what in (("i-hist", 0.1, "[1] 100k-record history, 2,000 records in the checked period"),
                            ("i-day", 0.3, "[2] daily-limit check in an org of 2,000 instances")):
        r = res[iid]
        med, floor = statistics.median(r["check"]), statistics.median(r["floor"])
        found = ", ".join(f"{f.kind} {f.credit_cents}c" for f in r["report"].result.findings)
        print(f"{what}: check median {med * 1000:.0f} ms (runs {', '.join(f'{x * 1000:.0f}' for x in r['check'])});"
              f" floor median {floor * 1000:.1f} ms; ratio {med / floor:.1f}x; goal < {goal * 1000:.0f} ms; {found}")


if __name__ == "__main__":
    main()
