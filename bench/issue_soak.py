"""Soak of approve-and-issue with faults injected at every step (issue: issue the credit exactly once).

    .venv/bin/python -m bench.issue_soak [--runs 200] [--seed 1]

Each run opens a case on its own instance, approves it, and issues it while our Polar server
injects faults (5xx, 429 with Retry-After, connections dropped before or after the work, on
every endpoint the issuer calls), a worker may be killed at a random moment (its task cancelled
mid-flight), and up to three workers may race. Afterwards a fresh worker resumes what is left,
as a restarted process would. Invariants checked per case: at most one refund per case and order;
an issued case has refunds summing to its issued amount and exactly one billing_corrections row;
no case is left approved or issuing; a failed case has a reason.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import Quiet, fresh_database, seed_duplicate_hours  # noqa: E402
from handlers.cases import authority_from_levels  # noqa: E402
from services.cases import CaseService, CheckRequest  # noqa: E402
from services.config import parse_config  # noqa: E402
from services.db import Database  # noqa: E402
from services.investigation import Investigator  # noqa: E402
from services.issuing import Issuer  # noqa: E402
from services.polar import PolarClient  # noqa: E402
from services.store import CaseStore  # noqa: E402
from tests.fakes.polar_server import TOKEN, FakePolar  # noqa: E402

CONFIG = parse_config({"levels": {4: {"users": ["U2"]}}})


async def authority(user):
    return authority_from_levels(CONFIG, user, (4,) if user == "U2" else ())
ROUTES = [("GET", "/v1/orders/"), ("GET", "/v1/refunds/"), ("POST", "/v1/refunds/"), ("POST", "/v1/refunds/"),
          ("POST", "/v1/events/ingest"), ("GET", "/v1/customers/external/{external_id}")]


async def soak(runs: int, seed_: int) -> dict:
    rng = random.Random(seed_)
    server, url = fresh_database()
    seed_duplicate_hours(url, runs, "soak")
    polar = FakePolar().start()
    db = await Database.connect(url, max_size=12)
    cases = CaseStore(db)
    await cases.migrate()
    service = CaseService(cases, Investigator(CONFIG, db), CONFIG, authority)
    client = PolarClient(polar.url, TOKEN, backoff=0.01, timeout=2)
    stats = Counter()
    case_ids = []
    t0 = time.perf_counter()
    for i in range(runs):
        cust = f"c-soak{i:04d}"
        polar.add_customer(cust)
        polar.add_order(cust, datetime(2026, 11, 1, tzinfo=timezone.utc), rng.choice([5000, 5000, 5000, 150]))
        method = rng.choice(["refund", "refund", "refund", "invoice_credit"])
        case = (await service.open(CheckRequest(f"i-soak{i:04d}", ["2026-10"], "U1", f"T-{i}"))).case
        assert (await service.approve(case.id, "U2", method)).ok
        case_ids.append(case.id)
        for _ in range(rng.randint(0, 3)):  # faults for this run
            method_, route = rng.choice(ROUTES)
            kind = rng.choice(["status", "status", "drop_after", "drop_before"])
            status = rng.choice([500, 502, 503, 429])
            polar.fail(method_, route, kind=kind, status=status, retry_after="0" if status == 429 else None)
            stats[f"fault {method_} {route} {kind if kind != 'status' else status}"] += 1
        workers = [Issuer(service, client, CONFIG, Quiet(), lookup_delay_s=0.01) for _ in range(rng.randint(1, 3))]
        tasks = [asyncio.create_task(w.issue(case.id)) for w in workers]
        if rng.random() < 0.3:  # kill one worker mid-flight
            await asyncio.sleep(rng.uniform(0, 0.05))
            tasks[0].cancel()
            stats["killed"] += 1
        await asyncio.gather(*tasks, return_exceptions=True)
        polar.faults.clear()
    restarted = Issuer(service, client, CONFIG, Quiet(), lookup_delay_s=0.01)
    resumed = await restarted.resume_unfinished()
    # a killed worker's POST may have been in flight: as the sweeper does a minute later, come back
    # once that window has passed
    await asyncio.sleep(2 * client.timeout_s)
    resumed += await restarted.resume_unfinished()
    elapsed = time.perf_counter() - t0

    problems = []
    refunds_by_case = Counter()
    refunded = Counter()
    per_order = Counter()
    for r in polar.refunds:
        cid = int(r["metadata"]["case_id"])
        refunds_by_case[cid] += 1
        refunded[cid] += r["amount"]
        per_order[(cid, r["order_id"])] += 1
    duplicates = sum(n - 1 for n in per_order.values() if n > 1)
    with psycopg.connect(url) as conn:
        rows = {r[0]: r for r in conn.execute(
            "SELECT id, state, issued_cents, reason, method FROM billing_bot.cases WHERE id = ANY(%s)", (case_ids,))}
        n_corrections = conn.execute("SELECT count(*) FROM billing_corrections").fetchone()[0]
    states = Counter(r[1] for r in rows.values())
    for cid, (_, state, issued, reason, method) in rows.items():
        if state in ("approved", "issuing"):
            problems.append(f"case {cid} left {state}")
        if state == "failed" and not reason:
            problems.append(f"case {cid} failed without a reason")
        if state == "issued" and method == "refund" and refunded[cid] != issued:
            problems.append(f"case {cid}: refunded {refunded[cid]} but issued {issued}")
    if n_corrections != states["issued"]:
        problems.append(f"{n_corrections} billing_corrections rows for {states['issued']} issued cases")
    await client.close()
    await db.close()
    polar.stop()
    return {"runs": runs, "seconds": round(elapsed, 1), "states": dict(states), "duplicate_refunds": duplicates,
            "left_unissued_or_unexplained": len([p for p in problems if "left" in p or "without" in p]),
            "problems": problems, "resumed_by_restart": len(resumed), "faults": sum(v for k, v in stats.items()
                                                                                   if k.startswith("fault")),
            "killed": stats["killed"], "violations": len(polar.violations), "violation_texts": polar.violations[:5]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    out = asyncio.run(soak(args.runs, args.seed))
    for k, v in out.items():
        print(f"{k}: {v}")
    sys.exit(1 if out["problems"] or out["duplicate_refunds"] or out["violations"] else 0)


if __name__ == "__main__":
    main()
