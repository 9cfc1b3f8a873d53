"""Every billed second credited once, every approved credit issued (issue 12), explored: hypothesis
drives random interleavings of people (checks, approvals, adjustments, rejections, retries, method
switches), two issuing workers racing, workers killed mid-flight, Polar faults (429, 5xx, a refund
made but its answer lost), Slack failing, and billing records changing under open cases, all against
real PostgreSQL and our Polar server. The invariants are checked after every step:

- no billed second is held or credited by two cases (the pieces of holding cases never meet), and no
  case moves more money than it proposed;
- Polar never holds two live refunds for one (case, order), and an issued case's money in Polar is
  exactly its issued amount;
- no decision was made by someone whose authority did not cover the amount that decided the level
  (the credit plus the customer's other recent credits);
- exactly one billing_corrections row per issued case, none for any other;
and at the end, with the faults gone, a bounded number of sweeps leaves no approved case unissued:
every case is issued (and announced) or failed with a reason.
"""
from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from datetime import datetime, timezone
from decimal import Decimal

import psycopg
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from handlers.cases import HOLDING, authority_from_levels
from services.cases import CaseService, CheckRequest
from services.config import parse_config
from services.db import Database
from services.investigation import Investigator
from services.issuing import Issuer
from services.polar import PolarClient
from services.polar_webhooks import parse as parse_event
from services.remediation import RemediationService
from services.store import Batches, CaseStore

from .conftest import _db_url
from .fakes.polar_server import TOKEN, FakePolar
from .seed import instance, record

CONFIG = parse_config({"levels": {1: {"users": ["U_AGENT", "U_AGENT2"]}, 2: {"users": ["U_LEAD"]},
                                  3: {"users": ["U_ENG"]}, 4: {"users": ["U_VP"]}}})
PEOPLE = ["U_AGENT", "U_AGENT2", "U_LEAD", "U_ENG", "U_VP"]
DECIDERS = st.sampled_from(PEOPLE) | st.sampled_from(["U_LEAD", "U_VP"])  # often someone who can
LIMIT = {"U_AGENT": Decimal("50"), "U_AGENT2": Decimal("50"), "U_LEAD": Decimal("500"), "U_VP": None}
INSTANCES = {"i-a": "c-1", "i-b": "c-1", "i-c": "c-2"}
PERIODS = [["2026-10"], ["2026-09"], ["2026-09", "2026-10"]]
ADMIN = {}
ENDINGS = Counter()  # how the explored cases ended, so a run shows what it reached
APPROVALS = Counter()


async def authority(user):
    levels = tuple(n for n, lv in CONFIG.levels.items() if user in lv.users)
    return authority_from_levels(CONFIG, user, levels)


class FlakyNotifier:
    """Slack, as the issuer sees it: sometimes it fails. It also checks, each time the customer is
    about to be told, that Polar really holds the money (issue 13: nobody is told of money Polar
    did not confirm)."""

    def __init__(self, polar):
        self.polar = polar
        self.fail_next = 0
        self.announced = Counter()
        self.told_without_money = []

    async def _maybe_fail(self):
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("slack is down")

    async def issued(self, case, refs, remainder):
        await self._maybe_fail()
        self.announced[case.id] += 1
        refunds = {r["id"]: r["status"] for r in self.polar.refunds}
        for ref in refs:
            if ref in refunds and refunds[ref] != "succeeded":
                self.told_without_money.append((case.id, ref, refunds[ref]))

    async def failed(self, case, reason, offer):
        await self._maybe_fail()

    async def rechecked(self, outcome):
        await self._maybe_fail()

    async def pending(self, case, refs):
        await self._maybe_fail()

    async def outside(self, case, amount, reason):
        await self._maybe_fail()

    async def reverted(self, case, refund_id, amount, status):
        await self._maybe_fail()

    async def remainder_offered(self, parent, child):
        await self._maybe_fail()


def seed(conn, polar):
    # i-a: one duplicated hour in October ($2.08). i-b: 30 duplicated hours in October ($62.40, a lead's).
    # i-c (another customer): duplicated hours in September and October; September's order can take $1.00.
    instance(conn, "i-a", customer="c-1", heartbeat="2026-12-31 00:00")
    instance(conn, "i-b", customer="c-1", heartbeat="2026-12-31 00:00")
    instance(conn, "i-c", customer="c-2", heartbeat="2026-12-31 00:00")
    record(conn, 1, "i-a", "2026-10-05 08:00", "2026-10-05 09:00", "2.08", customer="c-1")
    record(conn, 2, "i-a", "2026-10-05 08:00", "2026-10-05 09:00", "2.08", customer="c-1")
    record(conn, 3, "i-b", "2026-10-06 00:00", "2026-10-07 06:00", "62.40", customer="c-1")
    record(conn, 4, "i-b", "2026-10-06 00:00", "2026-10-07 06:00", "62.40", customer="c-1")
    record(conn, 9, "i-b", "2026-09-06 00:00", "2026-09-06 01:00", "2.08", customer="c-1")  # c-1 has no
    record(conn, 10, "i-b", "2026-09-06 00:00", "2026-09-06 01:00", "2.08", customer="c-1")  # September order
    record(conn, 5, "i-c", "2026-09-10 08:00", "2026-09-10 10:00", "4.16", customer="c-2")
    record(conn, 6, "i-c", "2026-09-10 08:00", "2026-09-10 10:00", "4.16", customer="c-2")
    record(conn, 7, "i-c", "2026-10-10 08:00", "2026-10-10 09:00", "2.08", customer="c-2")
    record(conn, 8, "i-c", "2026-10-10 08:00", "2026-10-10 09:00", "2.08", customer="c-2")
    for cust in ("c-1", "c-2"):
        polar.add_customer(cust)
        polar.add_order(cust, datetime(2026, 11, 1, 0, 5, tzinfo=timezone.utc), 50_000)
    polar.add_order("c-2", datetime(2026, 10, 1, 0, 5, tzinfo=timezone.utc), 100)


class MoneyMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.name = "sm_" + uuid.uuid4().hex[:10]
        with psycopg.connect(ADMIN["url"], autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {self.name} TEMPLATE cp_template")
        self.url = _db_url(ADMIN["url"], self.name)
        self.polar = FakePolar().start()
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("SET TIME ZONE 'UTC'")
            seed(conn, self.polar)
        self.next_record = 100
        self.run(self._open())

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    async def _open(self):
        self.db = await Database.connect(self.url, max_size=8)
        self.store = CaseStore(self.db)
        await self.store.migrate()
        self.service = CaseService(self.store, Investigator(CONFIG, self.db), CONFIG, authority)
        self.client = PolarClient(self.polar.url, TOKEN, backoff=0.01, timeout=2)
        self.notifier = FlakyNotifier(self.polar)
        self.workers = [Issuer(self.service, self.client, CONFIG, self.notifier, lookup_delay_s=0.01)
                        for _ in range(2)]
        # batches' cases are issued by the `issue` and `sweep` rules, like any approved case
        self.remediation = RemediationService(self.service, Batches(self.db))

    def case_ids(self, *states) -> list[int]:
        """Cases, most of the time in the states a rule is about, so the exploration goes deep."""
        with psycopg.connect(self.url) as conn:
            rows = conn.execute("SELECT id, state FROM billing_bot.cases ORDER BY id").fetchall()
        wanted = [i for i, s in rows if s in states]
        return wanted * 4 + [i for i, _ in rows] if wanted else [i for i, _ in rows]

    def deciding_before(self, case_id: int) -> int:
        """The amount that decides the level, computed independently of the service."""
        with psycopg.connect(self.url) as conn:
            cust, credit = conn.execute("SELECT customer_id, credit_cents FROM billing_bot.cases WHERE id = %s",
                                        (case_id,)).fetchone()
            other = conn.execute(
                "SELECT coalesce(sum(CASE WHEN state = 'issued' THEN issued_cents ELSE credit_cents END), 0)"
                " FROM billing_bot.cases WHERE customer_id = %s AND id <> %s AND state = ANY(%s)",
                (cust, case_id, list(HOLDING))).fetchone()[0]
        return credit + int(other)

    # --- people --------------------------------------------------------------------------------------

    @rule(instance_id=st.sampled_from(sorted(INSTANCES)), periods=st.sampled_from(PERIODS),
          user=st.sampled_from(PEOPLE))
    def check(self, instance_id, periods, user):
        out = self.run(self.service.open(CheckRequest(instance_id, periods, user)))
        assert out.status in ("done", "existing")

    @rule(instance_id=st.sampled_from(sorted(INSTANCES)), periods=st.sampled_from(PERIODS))
    def two_checks_at_once(self, instance_id, periods):
        """Two agents (or two replicas) check the same instance in the same moment."""
        async def go():
            return await asyncio.gather(self.service.open(CheckRequest(instance_id, periods, "U_AGENT")),
                                        self.service.open(CheckRequest(instance_id, periods, "U_AGENT2")))
        for out in self.run(go()):
            assert out.status in ("done", "existing")

    @rule(customer=st.sampled_from(["c-1", "c-2"]), periods=st.sampled_from(PERIODS), user=st.sampled_from(PEOPLE))
    def check_customer(self, customer, periods, user):
        """One case over every instance of the customer (issue 16), next to the instances' own."""
        for out in self.run(self.service.open_customer(customer, CheckRequest("", periods, user))):
            assert out.status in ("done", "existing"), out

    @rule(period=st.sampled_from(["2026-09", "2026-10"]), requester=st.sampled_from(PEOPLE), approver=DECIDERS,
          twice=st.booleans(), crash_after=st.none() | st.integers(0, 1))
    def remediate(self, period, requester, approver, twice, crash_after):
        """A remediation of the duplicates: one plan, one approval (or two at once: a double click,
        two replicas), one case per customer; or the approver's process dies while opening them."""
        batch, plan = self.run(self.remediation.propose("duplicate_charge", period, requester))
        real, opened = self.remediation._open_one, [0]
        if crash_after is not None:
            async def dies(*a, **kw):
                opened[0] += 1
                if opened[0] > crash_after:
                    raise ConnectionError("the replica died while opening the batch")
                return await real(*a, **kw)
            self.remediation._open_one = dies

        async def go():
            calls = [self.remediation.approve(batch["id"], approver) for _ in range(2 if twice else 1)]
            return await asyncio.gather(*calls)
        try:
            outs = self.run(go())
        finally:
            self.remediation._open_one = real
        done = [o for o in outs if o.ok]
        assert len(done) <= 1, "a batch approved twice"
        if done:
            APPROVALS["batch"] += 1
            limit = LIMIT.get(approver)
            assert approver in LIMIT and (limit is None or Decimal(plan.total_cents) / 100 <= limit), \
                (approver, plan.total_cents)

    @rule()
    def resume_batches(self):
        self.run(self.remediation.resume())

    def _decided(self, out, case_id, user, deciding):
        if out.ok:
            limit = LIMIT.get(user)
            assert user in LIMIT, f"{user} has no money authority but decided case {case_id}"
            assert limit is None or Decimal(deciding) / 100 <= limit, (user, deciding)

    @precondition(lambda self: self.case_ids())
    @rule(data=st.data(), user=DECIDERS, switch=st.booleans())
    def approve(self, data, user, switch):
        case_id = data.draw(st.sampled_from(self.case_ids("pending")))
        deciding = self.deciding_before(case_id)
        method = "invoice_credit" if switch else None
        out = self.run(self.service.approve(case_id, user, method))
        APPROVALS[out.status] += 1
        self._decided(out, case_id, user, deciding)

    @precondition(lambda self: self.case_ids())
    @rule(data=st.data(), user=st.sampled_from(PEOPLE), share=st.integers(1, 100))
    def adjust(self, data, user, share):
        case_id = data.draw(st.sampled_from(self.case_ids()))
        deciding = self.deciding_before(case_id)
        case = self.run(self.store.get(case_id))
        cents = max(1, case.credit_cents * share // 100)
        self._decided(self.run(self.service.adjust(case_id, user, cents)), case_id, user, deciding)

    @precondition(lambda self: self.case_ids())
    @rule(data=st.data(), user=st.sampled_from(PEOPLE))
    def reject(self, data, user):
        case_id = data.draw(st.sampled_from(self.case_ids()))
        deciding = self.deciding_before(case_id)
        self._decided(self.run(self.service.reject(case_id, user, "not our fault")), case_id, user, deciding)

    @precondition(lambda self: self.case_ids())
    @rule(data=st.data(), user=DECIDERS, switch=st.booleans(), stale=st.booleans())
    def retry(self, data, user, switch, stale):
        case_id = data.draw(st.sampled_from(self.case_ids("failed")))
        case = self.run(self.store.get(case_id))
        deciding = self.deciding_before(case_id)
        failure = case.failures - 1 if stale else case.failures  # an old failure's button, or the current one
        out = self.run(self.service.retry(case_id, user, failure, switch=switch))
        if stale:
            assert not out.ok
        self._decided(out, case_id, user, deciding)

    # --- machines ----------------------------------------------------------------------------------

    @precondition(lambda self: self.case_ids())
    @rule(data=st.data(), race=st.booleans(), kill_after=st.none() | st.floats(0, 0.03))
    def issue(self, data, race, kill_after):
        case_id = data.draw(st.sampled_from(self.case_ids("approved", "issuing")))

        async def go():
            tasks = [asyncio.create_task(w.issue_logged(case_id)) for w in self.workers[: 2 if race else 1]]
            if kill_after is not None:  # a worker dies mid-flight
                await asyncio.sleep(kill_after)
                tasks[0].cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.run(go())

    @rule()
    def sweep(self):
        self.run(self.workers[1].sweep_once(0))

    @rule(fault=st.sampled_from([("POST", "/v1/refunds/", "status", 500), ("POST", "/v1/refunds/", "drop_after", 0),
                                 ("POST", "/v1/refunds/", "drop_before", 0), ("GET", "/v1/refunds/", "status", 503),
                                 ("GET", "/v1/orders/", "status", 429), ("POST", "/v1/events/ingest", "status", 500),
                                 ("POST", "/v1/refunds/", "status", 429)]))
    def polar_fault(self, fault):
        method, route, kind, status = fault
        self.polar.fail(method, route, kind=kind, status=status or 500, retry_after="0" if status == 429 else None)

    @rule(status=st.sampled_from(["pending", "pending", "failed", "canceled"]))
    def polar_refund_outcome(self, status):
        """The next refund Polar creates is pending (or fails at once)."""
        self.polar.queue_refund_statuses(status)

    @precondition(lambda self: any(r["status"] == "pending" for r in self.polar.refunds))
    @rule(data=st.data(), outcome=st.sampled_from(["succeeded", "succeeded", "failed", "canceled"]),
          told=st.sampled_from(["webhook", "webhook twice", "nobody"]))
    def polar_settles_a_refund(self, data, outcome, told):
        """Polar settles a pending refund later; the bot hears it by webhook (maybe twice, maybe not
        at all: the sweeper's read-back is the fallback)."""
        refund = data.draw(st.sampled_from([r for r in self.polar.refunds if r["status"] == "pending"]))
        self.polar.settle_refund(refund["id"], outcome)
        if told == "nobody":
            return
        msg = self.polar.messages("refund.updated")[-1]
        event = parse_event(json.loads(msg.body))
        for _ in range(2 if told == "webhook twice" else 1):
            self.run(self.workers[0].on_polar_event(event, msg.id))
        self.run(self.workers[0].drain(10))

    @rule()
    def slack_fault(self):
        self.notifier.fail_next += 1

    @rule(instance_id=st.sampled_from(sorted(INSTANCES)))
    def records_change(self, instance_id):
        """Metering writes one more duplicate hour under whatever cases are open."""
        self.next_record += 1
        with psycopg.connect(self.url, autocommit=True) as conn:
            record(conn, self.next_record, instance_id, "2026-10-20 08:00", "2026-10-20 09:00", "2.08",
                   customer=INSTANCES[instance_id])

    # --- invariants ----------------------------------------------------------------------------------

    @invariant()
    def no_billed_second_held_or_credited_twice(self):
        with psycopg.connect(self.url) as conn:
            clashes = conn.execute(
                """SELECT a.case_id, b.case_id, a.record_id FROM billing_bot.case_pieces a
                   JOIN billing_bot.case_pieces b ON a.record_id = b.record_id AND a.case_id < b.case_id
                   JOIN billing_bot.cases ca ON ca.id = a.case_id AND ca.state = ANY(%s)
                   JOIN billing_bot.cases cb ON cb.id = b.case_id AND cb.state = ANY(%s)
                   WHERE (a.extra_events = 0 AND b.extra_events = 0
                          AND int8range(a.start_us, a.end_us) && int8range(b.start_us, b.end_us))
                      OR (a.extra_events > 0 AND b.extra_events > 0)""", (list(HOLDING), list(HOLDING))).fetchall()
            assert clashes == [], f"cases holding the same billed time: {clashes}"
            moved = conn.execute(
                "SELECT c.id, c.proposed_cents, coalesce(sum(i.amount_cents) FILTER (WHERE i.state = 'confirmed'), 0)"
                " FROM billing_bot.cases c LEFT JOIN billing_bot.issuances i ON i.case_id = c.id GROUP BY c.id").fetchall()
            for case_id, proposed, paid in moved:
                assert paid <= proposed, f"case {case_id} moved {paid} of {proposed}"

    @invariant()
    def polar_holds_each_refund_once_and_issued_money_matches(self):
        live = [r for r in self.polar.refunds if r["status"] not in ("failed", "canceled")]
        per_order = Counter((r["metadata"]["case_id"], r["order_id"]) for r in live)
        assert all(n == 1 for n in per_order.values()), per_order
        with psycopg.connect(self.url) as conn:
            issued = conn.execute("SELECT id, issued_cents, method FROM billing_bot.cases WHERE state = 'issued'"
                                  ).fetchall()
            paid = dict(conn.execute("SELECT case_id, sum(amount_cents) FROM billing_bot.issuances"
                                     " WHERE state = 'confirmed' GROUP BY case_id").fetchall())
        refunded = Counter()
        for r in live:
            refunded[int(r["metadata"]["case_id"])] += r["amount"]
        for case_id, cents, _method in issued:
            assert paid.get(case_id, 0) == cents, (case_id, cents, paid.get(case_id))
            assert refunded[case_id] <= cents

    @invariant()
    def a_batch_opens_one_case_per_customer_each_approved_within_the_approvers_authority(self):
        with psycopg.connect(self.url) as conn:
            per = conn.execute("SELECT batch_id, customer_id, count(*) FROM billing_bot.cases"
                               " WHERE batch_id IS NOT NULL AND parent_case_id IS NULL GROUP BY 1, 2").fetchall()
            assert all(n == 1 for _, _, n in per), per
            approvals = conn.execute(
                """SELECT e.case_id, e.actor, c.credit_cents FROM billing_bot.case_events e
                   JOIN billing_bot.cases c ON c.id = e.case_id
                   WHERE e.action = 'approved' AND e.detail ? 'batch_id' AND e.detail->>'batch_id' IS NOT NULL"""
            ).fetchall()
        for case_id, actor, _credit in approvals:
            assert actor in LIMIT, f"{actor} approved batch case {case_id} without money authority"

    @invariant()
    def nobody_told_of_money_polar_did_not_confirm(self):
        assert self.notifier.told_without_money == []

    @invariant()
    def one_correction_row_per_issued_case(self):
        with psycopg.connect(self.url) as conn:
            issued = {r[0] for r in conn.execute("SELECT id FROM billing_bot.cases WHERE state = 'issued'")}
            notes = [r[0] for r in conn.execute("SELECT notes FROM billing_corrections")]
        rows = Counter(int(n.split()[2]) for n in notes)
        assert set(rows) == issued and all(v == 1 for v in rows.values()), (rows, issued)

    def teardown(self):
        try:
            self.polar.faults.clear()
            self.notifier.fail_next = 0
            self.polar.refund_status_queue.clear()  # Polar settles refunds at once from now on
            for w in self.workers:
                w.poll_pending_after_s = 0  # and, as after 10 minutes, the bot reads the outcomes back
                w.in_flight_window_s = 0  # a cancelled worker's call ended with it (as a sweep minutes later)
            self.run(self.remediation.resume())  # a batch a crash left half opened opens the rest
            for _ in range(3):  # a bounded number of sweeps finishes whatever was approved
                for refund in [r for r in self.polar.refunds if r["status"] == "pending"]:
                    self.polar.settle_refund(refund["id"], "succeeded")  # Polar settles what it held
                self.run(self.workers[0].resume_unfinished(0))
            with psycopg.connect(self.url) as conn:
                rows = conn.execute("SELECT id, state, reason, notified FROM billing_bot.cases").fetchall()
            for case_id, state, reason, notified in rows:
                event(f"a case ended {state}")
                ENDINGS[state] += 1
                if state in ("approved", "issuing"):
                    with psycopg.connect(self.url) as conn:
                        detail = (conn.execute("SELECT state, attempts, polar_ref, refund_status, amount_cents, target"
                                               " FROM billing_bot.issuances WHERE case_id = %s", (case_id,)).fetchall(),
                                  [r[0] for r in conn.execute("SELECT action FROM billing_bot.case_events"
                                                              " WHERE case_id = %s ORDER BY id", (case_id,))],
                                  [(r["id"], r["status"], r["metadata"]) for r in self.polar.refunds])
                    raise AssertionError(f"case {case_id} left {state}: {detail}")
                assert state != "failed" or reason, f"case {case_id} failed without a reason"
                assert state != "issued" or notified, f"case {case_id} issued but never announced"
            self.one_correction_row_per_issued_case()
        finally:
            self.run(self.client.close())
            self.run(self.db.close())
            self.loop.close()
            self.polar.stop()
            with psycopg.connect(ADMIN["url"], autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


def test_money_moves_once_whatever_people_and_machines_do(pg_server):
    ADMIN["url"] = pg_server
    run_state_machine_as_test(MoneyMachine, settings=settings(
        max_examples=25, stateful_step_count=25, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    print(f"cases explored, by how they ended: {dict(ENDINGS)}; approvals: {dict(APPROVALS)}")
    assert ENDINGS["issued"] and ENDINGS["pending"], "the exploration reached issuing and open cases"
