"""Checks over many instances read a chunk of instances per snapshot (Investigator.check_many) and
Polar's usage events for several customers in one listing (PolarMemo). Held to the single check:
on random fleets, with metering duplicates in Polar (and events of another customer that must not
count), open and issued cases holding some of the time, and chunks and listings small enough that
customers and orgs are split across them, every instance's report is its own check's: findings,
credit, coverage, sources, the fingerprint, the cases holding its time."""
import asyncio
import random
from datetime import datetime, timezone

import pytest

from services import investigation, multi_check
from services.cases import CheckRequest
from services.db import Database
from services.investigation import Investigator
from services.multi_check import check_all
from services.polar import PolarClient

from .fakes.polar_server import TOKEN
from .test_multi_check import FLEET, seed_fleet, shape
from .test_remediation_batch import CONFIG, World

PERIODS = ["2026-10"]


def seed_polar_events(db, polar, rng):
    """Each customer in Polar; about one record in five metered twice, one in ten metered under
    another customer (not this instance's evidence: a listing of several customers must keep
    each event with its own customer)."""
    for cust in sorted({c for _, c, _ in FLEET.values()}):
        polar.add_customer(cust)
        polar.add_order(cust, datetime(2026, 11, 1, 0, 5, tzinfo=timezone.utc), 10_000_00)  # invoiced October
    records = db.execute("SELECT id, customer_id, instance_id, start_time, end_time FROM billing_records"
                         " ORDER BY id").fetchall()
    for rid, cust, iid, s, e in records:
        meta = {"instance_id": iid, "start_time": s.isoformat(), "end_time": e.isoformat(), "record_id": str(rid)}
        for _ in range(2 if rng.random() < 0.2 else 1):
            polar.add_usage_event(cust, "compute_hours", meta)
        if rng.random() < 0.1:
            other = rng.choice(sorted({c for _, c, _ in FLEET.values()} - {cust}))
            polar.add_usage_event(other, "compute_hours", meta)


def report_shape(r):
    res = r.result
    return (res.instance.instance_id, shape(res.findings), res.credit_cents, res.credit_by_period,
            r.coverage.as_json(), r.sources, r.fingerprint, r.holders, res.credited_before, res.notes, res.covered)


@pytest.mark.parametrize("seed", range(5))
def test_chunked_checks_are_each_instances_own_check(db, db_url, polar, monkeypatch, seed):
    rng = random.Random(700 + seed)
    seed_fleet(db, rng)
    seed_polar_events(db, polar, rng)
    instances = sorted(FLEET)

    async def go():
        # cases holding time: one open, one issued, so held pieces and holders are in play
        async with World(db_url, polar) as w:
            credited = [i for i in instances
                        if (await w.service.investigator.check(i, PERIODS)).result.credit_cents > 0]
            held = rng.sample(credited, 2)
            opened = [await w.service.open(CheckRequest(i, PERIODS, "U1")) for i in held]
            assert (await w.service.approve(opened[1].case.id, "U_VP")).ok
            await w.issuer.drain(30)
            assert (await w.service.store.get(opened[1].case.id)).state == "issued"
        dbx = await Database.connect(db_url)
        client = PolarClient(polar.url, TOKEN)
        try:
            inv = Investigator(CONFIG, dbx, polar=client)
            singles = {i: await inv.check(i, PERIODS) for i in instances}
            # chunks of 2 instances, listings of 1 customer: customers and orgs split across both
            monkeypatch.setattr(multi_check, "CHUNK", rng.choice([1, 2, 4]))
            monkeypatch.setattr(investigation, "EVENTS_PER_LISTING", rng.choice([1, 2]))
            many = await check_all(inv, instances, PERIODS)
            few_customers = await check_all(inv, instances, PERIODS, fingerprint=False, read_customer=False)
            return singles, many, few_customers
        finally:
            await client.close()
            await dbx.close()

    singles, many, bare = asyncio.run(go())
    # the property would be empty without evidence from each place it reads
    assert any(r.holders for r in singles.values())
    assert any(f.kind == "duplicate_charge" for r in singles.values() for f in r.result.findings)
    assert [r.result.instance.instance_id for r in many] == instances
    for r in many:
        single = singles[r.result.instance.instance_id]
        assert report_shape(r) == report_shape(single)
        assert r.customer == single.customer and r.customer is not None
        assert r.refund_room is None  # a result over many instances shows none: the orders are not read
    for r in bare:  # a plan: no fingerprint, no customer, the same verdicts
        single = singles[r.result.instance.instance_id]
        assert r.fingerprint == "" and r.customer is None
        assert shape(r.result.findings) == shape(single.result.findings)
        assert r.result.credit_cents == single.result.credit_cents


def test_a_listing_of_several_customers_is_one_call_and_each_instance_gets_its_own_events(db, db_url, polar,
                                                                                          monkeypatch):
    """Six instances of three customers, listings of two customers: two listings of events in
    all (page size permitting), one customer read per customer, and no orders."""
    from collections import Counter
    seed_fleet(db, random.Random(5))
    seed_polar_events(db, polar, random.Random(6))
    monkeypatch.setattr(investigation, "EVENTS_PER_LISTING", 2)

    async def go():
        dbx = await Database.connect(db_url)
        client = PolarClient(polar.url, TOKEN)
        try:
            polar.server.requests.clear()
            return await check_all(Investigator(CONFIG, dbx, polar=client), sorted(FLEET), PERIODS)
        finally:
            await client.close()
            await dbx.close()

    reports = asyncio.run(go())
    assert all(r.sources["polar"] == "ok" for r in reports)
    listings = [r for r in polar.server.requests if r.path == "/v1/events/" and r.query.get("page") == ["1"]]
    assert sorted(len(r.query["external_customer_id"]) for r in listings) == [1, 2]
    calls = Counter(r.path for r in polar.server.requests)
    assert calls["/v1/orders/"] == 0 and sum(n for p, n in calls.items() if p.startswith("/v1/customers/")) == 3
