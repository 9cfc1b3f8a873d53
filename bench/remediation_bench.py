"""A remediation batch at scale (SPEC 5.3): plan, approve, and issue every customer's case.

    .venv/bin/python -m bench.remediation_bench [--instances 20000] [--customers 2000] [--latency-ms 50]
        [--affected 3] [--check-polar yes|no] [--metered no|yes] [--workers 12] [--profile FILE]

Seeds period 2026-10 with `instances` instances spread over `customers` customers (10 each by
default, one org per customer). Each instance has three one-hour records on three days; the first
`--affected` instances of every customer have one of them billed twice (an exact duplicate record:
$2.08 of duplicate_charge), so every customer is affected. Each customer has a Polar customer and
an order created 2026-11-01 (the order invoicing October) in our Polar server, which runs in a
process of its own (so this process's RSS and CPU are the bot's) and answers every call after
`--latency-ms`; with `--metered yes` it also holds one usage event per billing record, as the
metering sends them.

The services are built as `bot/runtime.py` builds them: the pool of 8 and the issuing workers' own
pool (`Database.worker_pool`, workers + 1), an Investigator that reads Polar (`--check-polar yes`,
as production with a Polar key: usage events, 40 customers to a listing; Kubernetes is not
configured here) or not (`no`, as the tests' World), the Issuer with its default `workers`
(12, BILLING_BOT_ISSUING_WORKERS) and the PolarClient's default retries. Measured:
(a) `RemediationService.propose` wall time (goal < 10 s);
(b) approve + every case issued (the issuer drained, then a sweep for anything left) (goal < 2 min);
(c) peak RSS of this process (goal < 300 MB);
(d) Polar calls by method and path per phase, against what the batch needs.
Invariants checked: one refund per customer, one billing_corrections row per customer, refunds
summing to the plan's total. Prints a table and one JSON line.

Where the time goes (20,000 instances, 2,000 customers, 50 ms, this 2-core machine; README has
the figures before and after issue 16's changes):
- The plan: 5.4-5.7 s, 4.9 s of it CPU in this process, 693 SQL statements. The checks read a
  chunk of 250 instances per snapshot (Investigator.check_many: ~8 statements a chunk), 3 chunks at
  once; the orgs' daily-limit days 500 orgs to a statement; Polar's usage events 40 customers to a
  listing, all asked for at the start, 4 listings at once. The rules (handlers.pipeline) are now the
  largest part of the CPU (~35%), then psycopg's rows and the asyncio loop. Before (per instance:
  ~9 statements and one HTTP call) it was 99-104 s. With --metered yes (66,000 events, 700 pages a
  check) it is 11.8-12.4 s, CPU-bound: decoding the pages' JSON and placing the events ~2 s,
  httpx's connection pool ~1 s (it looks at every pooled connection for each request).
- Approving computes the whole plan again (the fingerprint binding of SPEC 5.3), with the
  fingerprints (one LATERAL statement a chunk) and no Polar customers (a batch case's letter looks
  its customer up), then opens the 2,000 cases 4 at once, each handed to the issuer as it opens:
  39-40 s in all.
- Issuing: each case is 3 Polar calls one after another (the orders, the read-back before the
  POST, the POST) plus ~25 statements, on one connection the worker holds for the whole case. The
  workers have a pool of their own (workers + 1), so their number does not take from the pool of 8.
  At 3 workers issuing took ~120 s for 2,000 cases; at 12 (the default) it overlaps the opening of
  the cases and ends ~20 s after it: approve to all issued 59-61 s. Past ~12 workers the machine's
  two cores are the limit (this process ~15 ms of CPU a case, PostgreSQL and our Polar the rest).
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import multiprocessing as mp
import pstats
import re
import resource
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import Quiet, copy_records, fresh_database  # noqa: E402
from handlers.cases import authority_from_levels  # noqa: E402
from services.investigation import EVENTS_PER_LISTING  # noqa: E402
from services.polar import PAGE_LIMIT  # noqa: E402
from services.cases import CaseService  # noqa: E402
from services.config import parse_config  # noqa: E402
from services.db import Database  # noqa: E402
from services.investigation import Investigator  # noqa: E402
from services.issuing import Issuer  # noqa: E402
from services.polar import PolarClient  # noqa: E402
from services.remediation import RemediationService  # noqa: E402
from services.store import Batches, CaseStore, Watchlist  # noqa: E402

PERIOD = "2026-10"
KIND = "duplicate_charge"
DAYS = (3, 10, 17)  # each instance's three billed hours in October
CONFIG = parse_config({"levels": {1: {"users": ["U1"]}, 2: {"users": ["U_LEAD"]}, 4: {"users": ["U_VP"]}}})


async def authority(user):
    levels = tuple(n for n, lv in CONFIG.levels.items() if user in lv.users)
    return authority_from_levels(CONFIG, user, levels)


# --- the data --------------------------------------------------------------------------------------

def customer_id(c: int) -> str:
    return f"c-{c:05d}"


def billed_hours(instances: int, customers: int, affected: int):
    """(customer, org, instance, start, end, copies) of every billed hour: the first `affected`
    instances of every customer have their first hour billed twice (copies 2)."""
    per = max(instances // customers, 1)
    for n in range(instances):
        c, k = divmod(n, per)
        c = min(c, customers - 1)
        cust, org, iid = customer_id(c), f"o-{c:05d}", f"i-{c:05d}-{k:03d}"
        for j, day in enumerate(DAYS):
            start = datetime(2026, 10, day, 8 + k % 8, tzinfo=timezone.utc)
            yield cust, org, iid, start, start.replace(hour=start.hour + 1), 2 if (j == 0 and k < affected) else 1


def seed_controlplane(conn, instances: int, customers: int, affected: int) -> int:
    """The instances and their records (COPY). Returns the number of duplicate records."""
    inst_rows, rec_rows = {}, []
    dups = 0
    created = datetime(2026, 9, 1, tzinfo=timezone.utc)
    for cust, org, iid, start, end, copies in billed_hours(instances, customers, affected):
        inst_rows[iid] = (iid, org, cust, "gpu", "running", created, created, None, None)
        for _ in range(copies):
            rec_rows.append((len(rec_rows) + 1, cust, org, iid, "gpu", "2.08", "1", "2.08", PERIOD, start, end))
        dups += copies - 1
    with conn.cursor() as cur:
        with cur.copy("COPY instances FROM STDIN") as copy:
            for r in inst_rows.values():
                copy.write_row(r)
    copy_records(conn, rec_rows)
    conn.execute("ANALYZE")
    return dups


def seed_polar(polar, customers: int, metered: tuple[int, int] | None = None) -> None:
    """Each customer and its October order; with metered=(instances, affected), one usage event
    per billing record, as the metering sends them (a record billed twice was metered twice, so
    Polar and the database agree and the events add no finding: the events are read, not credited)."""
    for c in range(customers):
        cust = customer_id(c)
        polar.add_customer(cust, email=f"{cust}@example.com", name=f"Customer {c}")
        polar.add_order(cust, datetime(2026, 11, 1, 0, 5, tzinfo=timezone.utc), 100_00)
    if metered:
        rid = 0
        for cust, _, iid, start, end, copies in billed_hours(metered[0], customers, metered[1]):
            for _ in range(copies):
                rid += 1
                polar.add_usage_event(cust, "compute_hours", {
                    "instance_id": iid, "start_time": start.isoformat(), "end_time": end.isoformat(),
                    "record_id": str(rid)})


# --- counting Polar's calls --------------------------------------------------------------------------

_ROUTES = [(re.compile(r"^/v1/customers/external/[^/]+$"), "/v1/customers/external/{id}")]


def call_name(req) -> str:
    """'GET /v1/refunds/?order_id' style: method, path template, and the filter for refunds."""
    path = next((t for p, t in _ROUTES if p.match(req.path)), req.path)
    if path == "/v1/refunds/" and req.method == "GET":
        path += "?id" if "id" in req.query else "?order_id"
    return f"{req.method} {path}"


def count_calls(requests) -> Counter:
    return Counter(call_name(r) for r in list(requests))


def refunds_summary(refunds) -> dict:
    per_order = Counter(r["order_id"] for r in refunds)
    per_case = Counter(r["metadata"].get("case_id") for r in refunds)
    return {"refunds": len(refunds), "orders_refunded": len(per_order),
            "orders_refunded_twice": sum(1 for n in per_order.values() if n > 1),
            "cases_refunded_twice": sum(1 for n in per_case.values() if n > 1),
            "refunded_cents": sum(r["amount"] for r in refunds)}


def _polar_process(conn, customers: int, latency_s: float, metered: tuple[int, int] | None) -> None:
    """Our Polar server in a process of its own; answers 'stats' and 'stop' on the pipe."""
    from tests.fakes.polar_server import FakePolar

    polar = FakePolar(latency_s=latency_s)
    seed_polar(polar, customers, metered)
    polar.start()
    conn.send(polar.url)
    while True:
        cmd = conn.recv()
        if cmd == "stats":
            with polar.lock:
                refunds = [dict(r) for r in polar.refunds]
            conn.send({"calls": count_calls(polar.server.requests), **refunds_summary(refunds),
                       "violations": len(polar.violations), "violation_texts": polar.violations[:3]})
        elif cmd == "stop":
            polar.stop()
            conn.send("stopped")
            return


class PolarProcess:
    def __init__(self, customers: int, latency_s: float, metered: tuple[int, int] | None = None):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_polar_process, args=(child, customers, latency_s, metered), daemon=True)
        self.proc.start()
        self.url = self.conn.recv()

    def stats(self) -> dict:
        self.conn.send("stats")
        return self.conn.recv()

    def stop(self) -> None:
        self.conn.send("stop")
        self.conn.recv()
        self.proc.join(10)


# --- the run ---------------------------------------------------------------------------------------

class Queries:
    """Statements sent to PostgreSQL by this process (every execute goes through a cursor's)."""

    n = 0

    @classmethod
    def install(cls) -> None:
        from psycopg import AsyncCursor

        real = AsyncCursor.execute

        async def counted(self, *a, **kw):
            cls.n += 1
            return await real(self, *a, **kw)
        AsyncCursor.execute = counted


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def diff(after: Counter, before: Counter) -> dict:
    return {k: after[k] - before[k] for k in sorted(after) if after[k] - before[k]}


def needed_calls(customers: int, metered: tuple[int, int] | None) -> dict[str, dict[str, int]]:
    """What the batch needs from Polar, by phase. Each check of the period (the plan, and the
    approval's recompute, which must see the evidence as it is then) lists every customer's usage
    events, EVENTS_PER_LISTING customers to a listing of PAGE_LIMIT events a page. Issuing, per
    customer: its orders (which order invoiced the period, what it can still refund), the read-back
    of that order's refunds before the POST (Polar's refunds take no idempotency key: a refund Polar
    made without our record of it must count as made), and the POST."""
    events = Counter()
    if metered:
        for cust, _, _, _, _, copies in billed_hours(metered[0], customers, metered[1]):
            events[cust] += copies
    ids = [customer_id(c) for c in range(customers)]
    pages = sum(max(1, -(-sum(events[c] for c in ids[n:n + EVENTS_PER_LISTING]) // PAGE_LIMIT))
                for n in range(0, len(ids), EVENTS_PER_LISTING))
    return {"plan": {"GET /v1/events/": pages},
            "approve_issue": {"GET /v1/events/": pages, "GET /v1/orders/": customers,
                              "GET /v1/refunds/?order_id": customers, "POST /v1/refunds/": customers}}


async def run(url: str, polar_url: str, stats, *, check_polar: bool, workers: int, customers: int,
              metered: tuple[int, int] | None) -> dict:
    db = await Database.connect(url)
    client = PolarClient(polar_url, "polar_oat_test_token")
    inv = Investigator(CONFIG, db, polar=client if check_polar else None)
    service = CaseService(CaseStore(db), inv, CONFIG, authority)
    await service.store.migrate()
    issuer = Issuer(service, client, CONFIG, Quiet(), workers=workers)
    service.issuer = issuer
    batches = Batches(db)
    remediation = RemediationService(service, batches, Watchlist(db))
    out: dict = {"rss_start_mb": round(rss_mb(), 1)}

    c0 = stats()["calls"]
    t0, cpu0, q0 = time.perf_counter(), cpu_s(), Queries.n
    batch, plan = await remediation.propose(KIND, PERIOD, "U1", "C1")
    out["plan_s"] = round(time.perf_counter() - t0, 2)
    out["plan_cpu_s"] = round(cpu_s() - cpu0, 2)  # this process's CPU (the rest: PostgreSQL, Polar, waiting)
    out["plan_sql_statements"] = Queries.n - q0
    out["plan_customers"] = len(plan.customers)
    out["plan_total_cents"] = plan.total_cents
    out["plan_instances"] = sum(len(c.instance_ids) for c in plan.customers)
    out["rss_after_plan_mb"] = round(rss_mb(), 1)
    c1 = stats()["calls"]

    approver = {1: "U1", 2: "U_LEAD"}.get(batch["required_level"], "U_VP")
    t1, cpu1, q1 = time.perf_counter(), cpu_s(), Queries.n
    done = await remediation.approve(batch["id"], approver)
    assert done.ok, done
    out["approve_s"] = round(time.perf_counter() - t1, 2)  # the plan again, every case opened and approved
    out["cases_opened"] = len(done.cases)
    c2 = stats()["calls"]
    await issuer.drain(3600)
    out["drained_s"] = round(time.perf_counter() - t1, 2)
    progress = await remediation.progress(batch["id"])
    out["issued_after_drain"] = progress.issued
    swept = await issuer.resume_unfinished(older_than_s=0)
    out["swept"] = len(swept)
    out["approve_to_all_issued_s"] = round(time.perf_counter() - t1, 2)
    out["approve_to_all_issued_cpu_s"] = round(cpu_s() - cpu1, 2)
    out["approve_to_all_issued_sql_statements"] = Queries.n - q1
    progress = await remediation.progress(batch["id"])
    out["issued"] = progress.issued
    out["issued_cents"] = progress.issued_cents
    out["rss_peak_mb"] = round(rss_mb(), 1)
    final = stats()
    out["calls_plan"] = diff(c1, c0)
    out["calls_approve"] = diff(c2, c1)  # the plan again, and the issuing that started meanwhile
    out["calls_issue"] = diff(final["calls"], c1)  # approve and issue together
    out["calls_needed"] = needed_calls(customers, metered if check_polar else None)
    for k in ("refunds", "orders_refunded", "orders_refunded_twice", "cases_refunded_twice", "refunded_cents",
              "violations", "violation_texts"):
        out[k] = final[k]
    with psycopg.connect(url) as conn:
        out["corrections"] = conn.execute("SELECT count(*) FROM billing_corrections").fetchone()[0]
        out["corrections_customers"] = conn.execute(
            "SELECT count(DISTINCT customer_id) FROM billing_corrections").fetchone()[0]
    await issuer.drain(10)
    await client.close()
    await db.close()
    return out


def check_polar_calls_extra(out: dict) -> dict:
    """Calls beyond what the batch needs, by phase (429s retried would show here: there are none)."""
    extra = {}
    for phase, made in (("plan", out["calls_plan"]), ("approve_issue", out["calls_issue"])):
        for k, n in made.items():
            if n > out["calls_needed"][phase].get(k, 0):
                extra[f"{phase} {k}"] = n - out["calls_needed"][phase].get(k, 0)
    return extra


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=20000)
    ap.add_argument("--customers", type=int, default=2000)
    ap.add_argument("--latency-ms", type=float, default=50)
    ap.add_argument("--affected", type=int, default=3, help="instances of each customer with a duplicated record")
    ap.add_argument("--check-polar", choices=("yes", "no"), default="yes",
                    help="the checks read Polar, as in production with a Polar key (yes), or not (no)")
    ap.add_argument("--metered", choices=("yes", "no"), default="no",
                    help="Polar also holds one usage event per billing record, as the metering sends them (yes: "
                         "66,000 events, 700 pages a check), or none (no: the issue's set-up)")
    ap.add_argument("--workers", type=int, default=Issuer.workers,
                    help=f"the Issuer's workers (its default: {Issuer.workers})")
    ap.add_argument("--profile", help="write cProfile stats here and print the top of them")
    args = ap.parse_args()

    Queries.install()
    polar = PolarProcess(args.customers, args.latency_ms / 1000,
                         (args.instances, args.affected) if args.metered == "yes" else None)
    server, url = fresh_database()
    t = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        dups = seed_controlplane(conn, args.instances, args.customers, args.affected)
    seed_s = round(time.perf_counter() - t, 1)
    prof = cProfile.Profile() if args.profile else None
    if prof:
        prof.enable()
    try:
        out = asyncio.run(run(url, polar.url, polar.stats, check_polar=args.check_polar == "yes",
                              workers=args.workers, customers=args.customers,
                              metered=(args.instances, args.affected) if args.metered == "yes" else None))
    finally:
        if prof:
            prof.disable()
            prof.dump_stats(args.profile)
        polar.stop()
    if prof:
        pstats.Stats(args.profile).sort_stats("cumulative").print_stats(30)
    out = {"instances": args.instances, "customers": args.customers, "duplicates": dups, "metered": args.metered,
           "latency_ms": args.latency_ms, "check_polar": args.check_polar, "workers": args.workers,
           "seed_s": seed_s, **out}
    problems = []
    if out["issued"] != args.customers:
        problems.append(f"{out['issued']} of {args.customers} issued")
    if out["orders_refunded_twice"] or out["cases_refunded_twice"] or out["refunds"] != args.customers:
        problems.append(f"{out['refunds']} refunds for {args.customers} customers")
    if out["corrections"] != args.customers or out["corrections_customers"] != args.customers:
        problems.append(f"{out['corrections']} corrections rows")
    if out["refunded_cents"] != out["plan_total_cents"]:
        problems.append(f"refunded {out['refunded_cents']} of {out['plan_total_cents']} cents")
    if out["violations"]:
        problems.append(f"{out['violations']} requests or responses off Polar's document")
    out["problems"] = problems

    rows = [("plan (propose)", f"{out['plan_s']} s", "< 10 s", out["plan_s"] < 10),
            ("approve (plan again + cases opened)", f"{out['approve_s']} s", "", None),
            ("approve -> all issued", f"{out['approve_to_all_issued_s']} s", "< 120 s",
             out["approve_to_all_issued_s"] < 120),
            ("peak RSS", f"{out['rss_peak_mb']} MB", "< 300 MB", out["rss_peak_mb"] < 300)]
    print(f"{'measure':40} {'figure':>12} {'goal':>10}  met")
    for name, fig, goal, met in rows:
        print(f"{name:40} {fig:>12} {goal:>10}  {'' if met is None else ('yes' if met else 'NO')}")
    print(f"this process's CPU: plan {out['plan_cpu_s']} s, approve -> issued {out['approve_to_all_issued_cpu_s']} s; "
          f"SQL statements: plan {out['plan_sql_statements']}, approve -> issued "
          f"{out['approve_to_all_issued_sql_statements']}")
    print(f"issued {out['issued']}/{args.customers} ({out['swept']} by the sweep), refunds {out['refunds']}, "
          f"corrections {out['corrections']}, refunded {out['refunded_cents']} of {out['plan_total_cents']} cents")
    need = out["calls_needed"]
    print(f"{'Polar calls':34} {'plan':>6} {'needed':>7} {'approve+issue':>14} {'needed':>7}")
    for k in sorted(set(out["calls_plan"]) | set(out["calls_issue"]) | set(need["plan"]) | set(need["approve_issue"])):
        print(f"{k:34} {out['calls_plan'].get(k, 0):>6} {need['plan'].get(k, 0):>7} "
              f"{out['calls_issue'].get(k, 0):>14} {need['approve_issue'].get(k, 0):>7}")
    if check_polar_calls_extra(out):
        problems.append("more Polar calls than the batch needs: " + json.dumps(check_polar_calls_extra(out)))
    print("problems:", problems or "none")
    print(json.dumps(out))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
