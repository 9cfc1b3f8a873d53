"""Benchmark of `check` (issue: the investigation).

    .venv/bin/python -m bench.check_bench

1. An instance with 20,000 billing records in an org of 200 instances: wall time of a check
   (database + rules), median of 5 runs. Goal: under 1 s.
2. 200 ms of latency injected on every Kubernetes and Polar request: the check's wall time versus
   the same check with the database alone. Goal: at most 1.2 x 200 ms plus the database time.
"""
from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import psycopg

from bench.common import copy_records, fresh_database
from services.config import Env, parse_config
from services.db import Database
from services.investigation import Investigator
from services.kube import KubeSource, api_client
from services.polar import PolarClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fakes.kube_server import FakeKube  # noqa: E402
from tests.fakes.polar_server import TOKEN, FakePolar  # noqa: E402

START = datetime(2026, 9, 15, tzinfo=timezone.utc)
NOW = datetime(2026, 11, 24, tzinfo=timezone.utc)
RATE = {"small": Decimal("0.083"), "gpu": Decimal("2.08")}


def seed(url: str) -> None:
    rows = []
    rid = 1
    # the instance under check: 20,000 five-minute records, billed as gpu, true tier small
    t = START
    for _ in range(20_000):
        end = t + timedelta(minutes=5)
        hours = Decimal(5) / 60
        rows.append((rid, "c-big", "o-big", "i-big", "gpu", RATE["gpu"], hours.quantize(Decimal("0.0001")),
                     (RATE["gpu"] * hours).quantize(Decimal("0.0001")), t.strftime("%Y-%m"), t, end))
        rid += 1
        t = end
    # 199 other instances, hourly, 10 hours a day for the same span
    for i in range(199):
        day = START
        while day < NOW:
            for h in range(8 + i % 5, 18 + i % 5):
                s = day + timedelta(hours=h)
                rows.append((rid, "c-big", "o-big", f"i-o{i:03d}", "small", RATE["small"], Decimal(1), RATE["small"],
                             s.strftime("%Y-%m"), s, s + timedelta(hours=1)))
                rid += 1
            day += timedelta(days=1)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO instances VALUES ('i-big','o-big','c-big','small','running',%s,%s,NULL,%s)",
                     (START, START, NOW))
        conn.execute("INSERT INTO instances VALUES ('i-lat','o-lat','c-lat','small','running',%s,%s,NULL,%s)",
                     (START, START, NOW))
        copy_records(conn, rows)
        small = [(rid + k, "c-lat", "o-lat", "i-lat", "gpu", RATE["gpu"], Decimal(1), RATE["gpu"], "2026-11",
                  datetime(2026, 11, 2, tzinfo=timezone.utc) + timedelta(hours=k),
                  datetime(2026, 11, 2, tzinfo=timezone.utc) + timedelta(hours=k + 1)) for k in range(48)]
        copy_records(conn, small)
        conn.execute("ANALYZE")
    print(f"seeded {len(rows) + 48:,} billing records", flush=True)


async def timed_checks(url: str, instance_id: str, runs: int, **sources) -> tuple[list[float], object]:
    db = await Database.connect(url)
    inv = Investigator(parse_config({}), db, now=lambda: NOW, **sources)
    times = []
    report = None
    try:
        for _ in range(runs):
            t0 = time.perf_counter()
            report = await inv.check(instance_id)
            times.append(time.perf_counter() - t0)
    finally:
        await db.close()
    return times, report


def main() -> None:
    server, url = fresh_database()
    seed(url)

    for label in ("default limits (continuous 8h claims most time)",
                  "continuous limit off: the daily limit is judged on every day"):
        times, report = asyncio.run(timed_checks(url, "i-big", 5))
        r = report.result
        print(f"[1] 20,000-record instance in a 200-instance org, {label}: median "
              f"{statistics.median(times) * 1000:.0f} ms, runs {', '.join(f'{x * 1000:.0f}' for x in times)} ms; "
              f"findings {', '.join(f'{f.kind} {f.credit_cents}c' for f in r.findings)}; goal < 1000 ms")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("INSERT INTO throttle_settings VALUES ('o-big', NULL, '24 hours', '30 minutes')"
                         " ON CONFLICT (org_id) DO NOTHING")

    db_times, _ = asyncio.run(timed_checks(url, "i-lat", 5))
    kube, polar = FakeKube(latency_s=0.2).start(), FakePolar(latency_s=0.2).start()
    kube.add_pod("orzbob-instances", "i-lat-0", {"instance-id": "i-lat", "org-id": "o-lat", "tier": "small"})
    kube.add_control_plane({"cp-a": ["2026/09/15 00:00:00 Creating instance i-lat (tier small, org o-lat)"],
                            "cp-b": []})
    polar.add_customer("c-lat")
    folder = tempfile.mkdtemp()
    env = Env(kubeconfig=str(kube.kubeconfig(Path(folder))))
    ks = KubeSource(api_client(env), parse_config({}).kubernetes)
    pc = PolarClient(polar.url, TOKEN)
    lat_times, rep = asyncio.run(timed_checks(url, "i-lat", 7, kube=ks, polar=pc))
    db_only = statistics.median(db_times)
    with_lat = statistics.median(lat_times)
    print(f"[2] 200 ms latency on every Kubernetes and Polar request: runs "
          f"{', '.join(f'{x * 1000:.0f}' for x in lat_times)} ms (the first is cold: the control plane's pod list "
          f"is then cached for 60 s); median {with_lat * 1000:.0f} ms "
          f"(database-only check {db_only * 1000:.0f} ms; budget 1.2 x 200 + db = {240 + db_only * 1000:.0f} ms); "
          f"sources {rep.sources}")
    print(f"    {len(kube.server.requests)} Kubernetes requests and {len(polar.server.requests)} Polar requests "
          f"in {len(lat_times)} checks")
    kube.stop()
    polar.stop()


if __name__ == "__main__":
    main()
