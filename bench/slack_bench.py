"""Benchmark of the Slack bot (issue: the Slack bot).

    .venv/bin/python -m bench.slack_bench [--commands 50]

Starts `billing-bot serve` against real PostgreSQL and our Slack API, sends 50 signed
/billing-check commands at once, and measures each ack (HTTP response) and whether every case
was posted. Goals: every ack under 3 s, p99 under 100 ms, every case posted.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import fresh_database  # noqa: E402
from tests.fakes.slack_server import FakeSlack  # noqa: E402
from tests.slack_harness import Bot  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--commands", type=int, default=50)
    args = ap.parse_args()
    n = args.commands
    server, url = fresh_database()
    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(n):
            conn.execute("INSERT INTO instances VALUES (%s,'o-b',%s,'small','running','2026-09-01Z','2026-09-01Z',"
                         "NULL,'2026-10-06Z')", (f"i-load{i:03d}", f"c-b{i}"))
            for k in range(2):
                conn.execute("INSERT INTO billing_records (id, customer_id, org_id, instance_id, tier, rate_per_hour,"
                             " hours_used, total_charge, billing_period, start_time, end_time) VALUES"
                             " (%s,%s,'o-b',%s,'gpu',2.08,1,2.08,'2026-10','2026-10-05 08:00Z','2026-10-05 09:00Z')",
                             (2 * i + k + 1, f"c-b{i}", f"i-load{i:03d}"))
    slack = FakeSlack().start()
    bot = Bot(url, slack, Path(tempfile.mkdtemp()))
    try:
        bot.command("i-load000 2026-10")  # warm up the process once
        deadline = time.time() + 30
        while len(slack.of("chat.update")) < 1 and time.time() < deadline:
            time.sleep(0.05)
        base = len(slack.of("chat.update"))
        t_start = time.perf_counter()
        load = subprocess.run([sys.executable, str(Path(__file__).with_name("slack_load.py")), bot.url, str(n)],
                              capture_output=True, text=True, timeout=120)
        result = json.loads(load.stdout)
        acks, statuses = result["acks"], result["statuses"]
        while len(slack.of("chat.update")) < base + n and time.perf_counter() < t_start + 120:
            time.sleep(0.05)
        all_posted = time.perf_counter() - t_start
        posted = len(slack.of("chat.update")) - base
        acks.sort()
        p99 = acks[min(len(acks) - 1, int(round(0.99 * len(acks))) - 1)]
        print(f"{n} concurrent /billing-check: statuses {sorted(set(statuses))}; ack median "
              f"{statistics.median(acks) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {acks[-1] * 1000:.0f} ms; "
              f"cases posted {posted}/{n} in {all_posted:.1f} s")
    finally:
        bot.stop()
        slack.stop()


if __name__ == "__main__":
    main()
