"""Soak of the served bot as production runs it: two `billing-bot serve` replicas on one database,
driven over signed HTTP as Slack drives them, against our Slack, Polar and SMTP servers.

    .venv/bin/python -m bench.replica_soak [--runs 40] [--seed 1]

Each run checks one instance on both replicas at the same moment (twin checks), approves the case
on both replicas at once (a double click across replicas), with Polar faults queued (5xx, 429,
responses lost after the refund was made) and a refund outcome drawn at random: succeeded at once;
pending, then succeeded; pending, then failed (the approver then issues the unpaid part as invoice
credit from the failure's button). Now and then a replica is killed (SIGKILL) mid-run and started
again. Polar's webhooks go to the replica that is up. At the end every case must be issued or
failed with a reason, and:
- duplicate cases (two holding cases over one instance's time): 0;
- duplicate refunds (two live refunds for one case and order): 0;
- stranded cases (approved or issuing at the end): 0;
- customers told of money Polar did not confirm (an email for a case whose refund failed and that
  was not otherwise credited): 0;
- billing_corrections rows: exactly one per issued case.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import fresh_database, seed_duplicate_hours  # noqa: E402
from tests.fakes.polar_server import TOKEN, WEBHOOK_SECRET, FakePolar  # noqa: E402
from tests.fakes.slack_server import FakeSlack  # noqa: E402
from tests.slack_harness import Bot, free_port, wait_for  # noqa: E402

FAULTS = [("POST", "/v1/refunds/", "status", 500), ("POST", "/v1/refunds/", "drop_after", 0),
          ("GET", "/v1/refunds/", "status", 503), ("GET", "/v1/orders/", "status", 429),
          ("POST", "/v1/events/ingest", "status", 500)]
OUTCOMES = ["succeeded", "succeeded", "pending_succeeded", "pending_failed"]


class Inbox:
    def __init__(self):
        self.messages = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.rcpt_tos, envelope.content.decode(errors="replace")))
        return "250 OK"


def rows(url: str, sql: str, args=()):
    with psycopg.connect(url) as conn:
        return conn.execute(sql, args).fetchall()


def click(bot: Bot, case_id: int, user: str) -> None:
    """A click on a replica that may be killed meanwhile: its connection resets, as Slack would see."""
    import httpx
    try:
        bot.action("case_approve", case_id, user)
    except httpx.HTTPError:
        pass


def soak(runs: int, seed_: int, tmp: Path, kill_at: frozenset[int] = frozenset()) -> dict:
    from aiosmtpd.controller import Controller

    rng = random.Random(seed_)
    server, url = fresh_database()
    seed_duplicate_hours(url, runs, "rs")
    polar = FakePolar().start()
    slack = FakeSlack({"S_LEADS": ["U_LEAD2"]}).start()
    inbox = Inbox()
    port = free_port()
    smtp = Controller(inbox, hostname="127.0.0.1", port=port)
    smtp.start()
    env = {"POLAR_API_URL": polar.url, "POLAR_API_KEY": TOKEN, "POLAR_WEBHOOK_SECRET": WEBHOOK_SECRET,
           "SMTP_URL": f"smtp://127.0.0.1:{port}?from=support@orzbob.cloud", "BILLING_BOT_SWEEP_S": "0.5",
           "BILLING_BOT_SWEEP_AGE_S": "2", "BILLING_BOT_POLL_PENDING_S": "5"}
    bots = [Bot(url, slack, tmp, extra_env=env) for _ in range(2)]
    stats = Counter()
    plan: dict[int, str] = {}
    t0 = time.perf_counter()

    def point_webhooks():
        polar.webhook_endpoint(bots[0].url + "/polar/webhooks", WEBHOOK_SECRET)

    def case_of(iid):
        found = rows(url, "SELECT id FROM billing_bot.cases WHERE instance_id = %s ORDER BY id", (iid,))
        return found[0][0] if found else None

    try:
        point_webhooks()
        for i in range(runs):
            iid, cust = f"i-rs{i:04d}", f"c-rs{i:04d}"
            polar.add_customer(cust, email=f"{cust}@example.com", name=f"Customer {i}")
            polar.add_order(cust, datetime(2026, 11, 1, 0, 5, tzinfo=timezone.utc), 5000)
            outcome = rng.choice(OUTCOMES)
            polar.queue_refund_statuses("succeeded" if outcome == "succeeded" else "pending")
            # twin checks: both replicas at the same moment
            twins = [threading.Thread(target=b.command, args=(f"{iid} 2026-10", u))
                     for b, u in zip(bots, ("U_AGENT", "U_AGENT2"))]
            for t in twins:
                t.start()
            for t in twins:
                t.join()
            case_id = wait_for(lambda: case_of(iid), what=f"case of {iid}")
            plan[case_id] = outcome
            for _ in range(rng.randint(0, 2)):
                method, route, kind, status = rng.choice(FAULTS)
                polar.fail(method, route, kind=kind, status=status or 500, retry_after="0" if status == 429 else None)
                stats["faults"] += 1
            clicks = [threading.Thread(target=click, args=(b, case_id, "U_LEAD")) for b in bots]
            for t in clicks:
                t.start()
            if rng.random() < 0.15 or i in kill_at:  # a replica dies mid-run and comes back
                time.sleep(rng.uniform(0, 0.2))
                bots[1].proc.kill()
                bots[1].proc.wait()
                stats["killed"] += 1
                for t in clicks:
                    t.join()
                bots[1] = Bot(url, slack, tmp, extra_env=env)
            for t in clicks:
                t.join()
        # Polar settles the pending refunds; the failed ones are issued as invoice credit
        deadline = time.time() + 60
        settled = set()
        while time.time() < deadline:  # every refund Polar holds pending is settled as planned
            waiting = [r for r in polar.refunds if r["status"] == "pending"]
            for refund in waiting:
                cid = int(refund["metadata"].get("case_id", 0))
                if cid not in settled or plan.get(cid) != "pending_failed":
                    polar.settle_refund(refund["id"], "failed" if plan.get(cid) == "pending_failed"
                                       and cid not in settled else "succeeded")
                    settled.add(cid)
            polar.deliver()
            if not waiting and all(c in settled for c, o in plan.items() if o.startswith("pending")):
                break
            time.sleep(0.3)
        polar.faults.clear()
        failed_told = set()
        deadline = time.time() + 90
        while time.time() < deadline:
            polar.deliver()
            states = dict(rows(url, "SELECT id, state FROM billing_bot.cases"))
            for cid, state in states.items():
                if state == "failed" and plan.get(cid) == "pending_failed" and cid not in failed_told:
                    failures = rows(url, "SELECT failures FROM billing_bot.cases WHERE id = %s", (cid,))[0][0]
                    payload = {"type": "block_actions", "user": {"id": "U_LEAD"}, "team": {"id": "T1"},
                               "api_app_id": "A1", "trigger_id": "t", "channel": {"id": "C_SUPPORT"},
                               "container": {"type": "message"},
                               "actions": [{"action_id": "case_invoice_credit", "block_id": "b",
                                            "value": f"{cid}:{failures}", "type": "button"}]}
                    bots[0].post({"payload": json.dumps(payload)})
                    failed_told.add(cid)
            unfinished = [c for c, s in states.items() if s in ("approved", "issuing", "pending")
                          or (s == "failed" and plan.get(c) == "pending_failed")]
            if not unfinished:
                break
            time.sleep(0.5)
        time.sleep(2)  # the last announcements
        elapsed = time.perf_counter() - t0
    finally:
        for b in bots:
            b.stop()
        smtp.stop()
        slack.stop()

    states = dict(rows(url, "SELECT id, state FROM billing_bot.cases"))
    reasons = dict(rows(url, "SELECT id, reason FROM billing_bot.cases"))
    holding = rows(url, "SELECT instance_id, count(*) FROM billing_bot.cases WHERE state IN"
                        " ('pending','approved','issuing','failed','issued') GROUP BY instance_id HAVING count(*) > 1")
    live = [r for r in polar.refunds if r["status"] not in ("failed", "canceled")]
    per_order = Counter((r["metadata"]["case_id"], r["order_id"]) for r in live)
    succeeded = Counter(int(r["metadata"]["case_id"]) for r in polar.refunds if r["status"] == "succeeded")
    ingested = Counter(e["metadata"].get("case_id") for e in polar.events if e["metadata"].get("case_id"))
    money = {cid for cid in states if succeeded[cid] or ingested[str(cid)]}
    emailed_customers = Counter(to[0].split("@")[0] for to, _ in inbox.messages)
    customer_of = dict(rows(url, "SELECT id, customer_id FROM billing_bot.cases"))
    told_without_money = [c for c in emailed_customers
                          if not any(customer_of[cid] == c and cid in money for cid in states)]
    n_corrections = rows(url, "SELECT count(*) FROM billing_corrections")[0][0]
    expired_with_credit = rows(url, "SELECT count(*) FROM billing_bot.cases WHERE state = 'expired' AND credit_cents > 0"
                                    " AND id NOT IN (SELECT case_id FROM billing_bot.case_events WHERE action = 'expired')")[0][0]
    issued = sum(1 for s in states.values() if s == "issued")
    server.cleanup()
    polar.stop()
    return {
        "runs": runs, "seconds": round(elapsed, 1), "states": dict(Counter(states.values())),
        "outcomes": dict(Counter(plan.values())), "faults": stats["faults"], "replica_kills": stats["killed"],
        "duplicate_cases": len(holding), "duplicate_refunds": sum(n - 1 for n in per_order.values() if n > 1),
        "stranded": sum(1 for s in states.values() if s in ("approved", "issuing")),
        "failed_without_reason": sum(1 for c, s in states.items() if s == "failed" and not reasons[c]),
        "customers_told_of_money_not_moved": len(told_without_money),
        "emails": len(inbox.messages), "emails_per_customer_max": max(emailed_customers.values(), default=0),
        "corrections_rows": n_corrections, "issued": issued, "polar_violations": len(polar.violations),
        "expired_with_credit": expired_with_credit,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    out = soak(args.runs, args.seed, Path(tempfile.mkdtemp(prefix="replica-soak-")))
    for k, v in out.items():
        print(f"{k}: {v}")
    bad = (out["duplicate_cases"] or out["duplicate_refunds"] or out["stranded"] or out["failed_without_reason"]
           or out["customers_told_of_money_not_moved"] or out["corrections_rows"] != out["issued"]
           or out["polar_violations"] or out["expired_with_credit"])
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
