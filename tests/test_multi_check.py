"""`check customer` / `check org` (services/multi_check.py) against the sum of per-instance checks:
on random histories of several instances, orgs and customers, every instance's findings are those
of its own check, the credit and level are the sums, and each org's daily-limit intervals are read
once (not once per instance). The remediation plan is held to the same checks."""
import asyncio
import random
from collections import Counter
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from handlers.remediation import build_plan
from services.config import parse_config
from services.db import Database
from services.investigation import Investigator
from services.multi_check import check_customer, check_org
from services.remediation import findings_of, plan_remediation

from .seed import throttle as seed_throttle

BASE = datetime(2026, 10, 3, tzinfo=timezone.utc)
# instance -> (org, customer, true tier)
FLEET = {"i-a1": ("o-a", "c-1", "small"), "i-a2": ("o-a", "c-1", "gpu"), "i-a3": ("o-a", "c-2", "small"),
         "i-b1": ("o-b", "c-1", "medium"), "i-b2": ("o-b", "c-3", "gpu"), "i-c1": ("o-c", "c-3", "small")}


def seed_fleet(db, rng):
    """Busy days: the orgs' instances overlap enough to pass small daily limits; duplicates,
    overlaps, wrong tiers, stopped instances, and some records in another period."""
    seed_throttle(db, "o-a", "3 hours", "5 hours", None)
    seed_throttle(db, "o-b", None, "4 hours", "30 minutes")
    # o-c has no row: the defaults (8 h / 24 h / 30 min)
    rid = 1
    for iid, (org, cust, tier) in FLEET.items():
        stopped = BASE + timedelta(days=rng.randrange(1, 4), hours=rng.randrange(24)) if rng.random() < 0.3 else None
        heartbeat = BASE + timedelta(days=rng.randrange(0, 4), hours=rng.randrange(24)) if rng.random() < 0.5 else None
        db.execute("INSERT INTO instances VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                   (iid, org, cust, tier, "stopped" if stopped else "running", BASE - timedelta(days=30),
                    BASE - timedelta(days=30), stopped, heartbeat))
        t = BASE + timedelta(minutes=rng.randrange(0, 300))
        for _ in range(rng.randrange(8, 25)):
            length = timedelta(minutes=rng.choice([30, 60, 60, 120, 300]))
            spans = [(t, t + length)]
            roll = rng.random()
            if roll < 0.12:
                spans.append((t, t + length))  # exact duplicate
            elif roll < 0.2:
                spans.append((t + length / 2, t + length * 2))  # overlap
            billed = "gpu" if rng.random() < 0.3 else tier
            rate = {"small": "0.083", "medium": "0.167", "large": "0.333", "gpu": "2.08"}[billed]
            for s, e in spans:
                hours = (Decimal((e - s).total_seconds()) / 3600).quantize(Decimal("0.0001"))
                period = "2026-09" if rng.random() < 0.05 else s.strftime("%Y-%m")
                db.execute("INSERT INTO billing_records (id, customer_id, org_id, instance_id, tier, rate_per_hour,"
                           " hours_used, total_charge, billing_period, start_time, end_time) VALUES"
                           " (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                           (rid, cust, org, iid, billed, Decimal(rate), hours,
                            (hours * Decimal(rate)).quantize(Decimal("0.0001")), period, s, e))
                rid += 1
            t += length + timedelta(minutes=rng.choice([0, 0, 0, 1, 30, 240]))


def shape(findings):
    return [(f.kind, f.credit_cents, f.hours, f.record_ids, f.summary) for f in findings]


def run(db_url, scenario):
    async def go():
        dbx = await Database.connect(db_url)
        calls = Counter()
        real = dbx.org_intervals

        async def counting(conn, org_id, days, limit):
            calls[org_id] += 1
            return await real(conn, org_id, days, limit)
        dbx.org_intervals = counting
        real_of = dbx.org_intervals_of

        async def counting_of(conn, wanted):  # many orgs in one statement: each org counts once
            calls.update(list(wanted))
            return await real_of(conn, wanted)
        dbx.org_intervals_of = counting_of
        try:
            inv = Investigator(parse_config({}), dbx)
            return await scenario(inv, calls)
        finally:
            await dbx.close()
    return asyncio.run(go())


@pytest.mark.parametrize("seed", range(6))
def test_customer_and_org_checks_are_the_sums_of_their_instances_checks(db, db_url, seed):
    rng = random.Random(seed)
    seed_fleet(db, rng)
    periods = ["2026-10"]

    async def scenario(inv, calls):
        singles = {i: await inv.check(i, periods) for i in FLEET}
        single_calls = Counter(calls)
        calls.clear()
        cust = await check_customer(inv, "c-1", periods)
        customer_calls = Counter(calls)
        calls.clear()
        orgs = await check_org(inv, "o-a", periods)
        org_calls = Counter(calls)
        return singles, single_calls, cust, customer_calls, orgs, org_calls

    singles, single_calls, cust, customer_calls, orgs, org_calls = run(db_url, scenario)
    # the property would be empty if nothing hit the daily limit: the fleet is built to
    assert sum(single_calls.values()) >= 2

    mine = sorted(i for i, (_, c, _) in FLEET.items() if c == "c-1")
    assert [r.result.instance.instance_id for r in cust.reports] == mine
    for r in cust.reports:
        assert shape(r.result.findings) == shape(singles[r.result.instance.instance_id].result.findings)
    assert cust.credit_cents == sum(singles[i].result.credit_cents for i in mine)
    assert cust.required_level == parse_config({}).required_level(cust.credit_cents)
    js = cust.as_json()
    assert js["instance_id"] is None and js["customer_id"] == "c-1" and js["credit_cents"] == cust.credit_cents
    assert [x["instance_id"] for x in js["instances"]] == mine
    assert sum(x["credit_cents"] for x in js["instances"]) == js["credit_cents"]
    assert sum(f["credit_cents"] for f in js["findings"]) == js["credit_cents"]
    # each org's daily limit read at most once for all its instances, not once per instance
    assert all(n == 1 for n in customer_calls.values()), customer_calls
    assert set(customer_calls) <= {"o-a", "o-b"}

    # an org spanning customers: one result per customer, together every instance of the org
    assert [m.customer_id for m in orgs] == ["c-1", "c-2"]
    assert sorted(r.result.instance.instance_id for m in orgs for r in m.reports) == ["i-a1", "i-a2", "i-a3"]
    for m in orgs:
        assert m.credit_cents == sum(singles[r.result.instance.instance_id].result.credit_cents for r in m.reports)
        for r in m.reports:
            assert shape(r.result.findings) == shape(singles[r.result.instance.instance_id].result.findings)
    assert dict(org_calls) in ({}, {"o-a": 1})
    assert single_calls["o-a"] >= org_calls["o-a"]


def test_the_daily_limit_is_read_once_for_an_org_of_many_instances(db, db_url):
    """Four instances of one org on one busy day: four single checks read the org's day four
    times; the org check once, with the same excess for each instance."""
    seed_throttle(db, "o-a", None, "2 hours", None)
    for n in range(4):
        db.execute("INSERT INTO instances VALUES (%s,'o-a','c-1','small','running',%s,%s,NULL,NULL)",
                   (f"i-{n}x", BASE, BASE))
        db.execute("INSERT INTO billing_records (id, customer_id, org_id, instance_id, tier, rate_per_hour,"
                   " hours_used, total_charge, billing_period, start_time, end_time) VALUES"
                   " (%s,'c-1','o-a',%s,'small',0.083,2,0.166,'2026-10',%s,%s)",
                   (n + 1, f"i-{n}x", BASE + timedelta(hours=n), BASE + timedelta(hours=n + 2)))

    async def scenario(inv, calls):
        singles = [await inv.check(f"i-{n}x", ["2026-10"]) for n in range(4)]
        single = calls["o-a"]
        calls.clear()
        (org,) = await check_org(inv, "o-a", ["2026-10"])
        return singles, single, org, calls["o-a"]

    singles, single_reads, org, org_reads = run(db_url, scenario)
    assert single_reads == 4 and org_reads == 1
    assert org.credit_cents == sum(s.result.credit_cents for s in singles) > 0
    assert [f["kind"] for f in org.as_json()["findings"]] == ["throttle_daily"]


@pytest.mark.parametrize("seed", range(4))
def test_the_plan_totals_are_the_sums_of_the_instances_checks_of_that_kind(db, db_url, seed):
    rng = random.Random(100 + seed)
    seed_fleet(db, rng)

    async def scenario(inv, calls):
        singles = [await inv.check(i, ["2026-10"]) for i in FLEET]
        plans = {k: await plan_remediation(inv, k, "2026-10") for k in
                 ("duplicate_charge", "stuck_instance", "throttle_continuous", "throttle_daily", "wrong_tier")}
        return singles, plans

    singles, plans = run(db_url, scenario)
    assert any(p.total_cents for p in plans.values())
    for kind, plan in plans.items():
        want: dict[str, int] = {}
        for s in singles:
            for f in s.result.findings:
                if f.kind == kind:
                    want[s.result.instance.customer_id] = want.get(s.result.instance.customer_id, 0) + f.credit_cents
        assert {c.customer_id: c.credit_cents for c in plan.customers} == want
        assert plan.total_cents == sum(want.values())
        assert plan == build_plan(kind, "2026-10", [findings_of(s) for s in singles])
        others = {f.kind for s in singles for f in s.result.findings} - {kind}
        assert set(plan.other_kinds) == others


def test_a_customer_check_reads_the_customer_and_its_usage_events_from_polar_once(db, db_url, polar):
    """Over many instances Polar is read per customer, not per instance: the customer (the letter)
    once, and the usage events of all its instances in one listing, each instance judged by its own
    events. The orders are not read: a result over many instances shows no refund room."""
    from collections import Counter as C

    from services.polar import PolarClient
    from .fakes.polar_server import TOKEN
    for n in range(3):
        db.execute("INSERT INTO instances VALUES (%s,'o-a','c-1','small','running',%s,%s,NULL,NULL)",
                   (f"i-{n}p", BASE, BASE))
        db.execute("INSERT INTO billing_records (id, customer_id, org_id, instance_id, tier, rate_per_hour,"
                   " hours_used, total_charge, billing_period, start_time, end_time) VALUES"
                   " (%s,'c-1','o-a',%s,'small',0.083,1,0.083,'2026-10',%s,%s)",
                   (n + 1, f"i-{n}p", BASE + timedelta(hours=n), BASE + timedelta(hours=n + 1)))
    polar.add_customer("c-1")
    # i-1p's hour metered twice (one record): a duplicate charge on i-1p only
    for _ in range(2):
        polar.add_usage_event("c-1", "compute_hours", {
            "instance_id": "i-1p", "start_time": (BASE + timedelta(hours=1)).isoformat(),
            "end_time": (BASE + timedelta(hours=2)).isoformat(), "record_id": "2"})

    async def go():
        dbx = await Database.connect(db_url)
        client = PolarClient(polar.url, TOKEN)
        try:
            inv = Investigator(parse_config({}), dbx, polar=client)
            return await check_customer(inv, "c-1", ["2026-10"])
        finally:
            await client.close()
            await dbx.close()

    result = asyncio.run(go())
    assert [r.sources["polar"] for r in result.reports] == ["ok"] * 3
    assert all(r.customer is not None and r.refund_room is None for r in result.reports)
    assert {r.result.instance.instance_id: [f.kind for f in r.result.findings] for r in result.reports} == {
        "i-0p": [], "i-1p": ["duplicate_charge"], "i-2p": []}
    calls = C(r.path for r in polar.server.requests)
    assert calls == {"/v1/customers/external/c-1": 1, "/v1/events/": 1}
