"""Attack 6 on the bulk checks (Investigator.check_many, multi_check.check_all, PolarMemo's
listings of several customers, the multi-org org_days.sql, records_of, evidence_fingerprints,
held_pieces_of): each answer held to what a single check (or the statement it replaced) gives."""
from __future__ import annotations

import asyncio
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest

from handlers.cases import HOLDING
from handlers.model import OrgInterval, PriorCase, PriorCover
from handlers.timeline import to_us
from services import investigation, multi_check, polar as polar_module, store
from services.db import ORG_DAY_FIRST_BOUND, Database
from services.investigation import Investigator
from services.multi_check import check_all
from services.polar import PolarClient
from services.store import CaseStore

from .fakes.polar_server import TOKEN
from .seed import instance, record
from .test_remediation_batch import CONFIG

PERIODS = ["2026-10"]
EVENT = "compute_hours"


def _hourly(db, polar, customers: int, hours: int, *, rid: int = 1) -> int:
    """One instance per customer, `hours` clean hours in October, two hours apart (no finding of
    any kind), each hour metered once in Polar."""
    for c in range(customers):
        cust, iid, org = f"c-{c:02d}", f"i-{c:02d}", f"o-{c:02d}"
        polar.add_customer(cust, email=f"{cust}@example.com")
        instance(db, iid, org=org, customer=cust, tier="gpu", created="2026-09-01 00:00")
        t = datetime(2026, 10, 5, tzinfo=timezone.utc)
        for h in range(hours):
            s, e = t + timedelta(hours=3 * h), t + timedelta(hours=3 * h + 1)
            record(db, rid, iid, s.strftime("%Y-%m-%d %H:%M"), e.strftime("%Y-%m-%d %H:%M"), "2.08",
                   org=org, customer=cust)
            polar.add_usage_event(cust, EVENT, {"instance_id": iid, "start_time": s.isoformat(),
                                                "end_time": e.isoformat(), "record_id": str(rid)})
            rid += 1
    return rid


async def _with_inv(db_url, polar, body, attempts: int = 4):
    dbx = await Database.connect(db_url)
    client = PolarClient(polar.url, TOKEN, backoff=0.01, attempts=attempts)
    try:
        return await body(Investigator(CONFIG, dbx, polar=client))
    finally:
        await client.close()
        await dbx.close()


# --- Polar: a listing of several customers is paged; Polar adds events while it is read ---------------

def test_an_event_metered_while_a_listing_is_paged_is_not_counted_twice(db, db_url, polar, monkeypatch):
    """Polar lists events newest first, by page number. A metering event ingested between page 1
    and page 2 (a running instance of any of the listing's 40 customers) pushes page 1's last event
    onto page 2: the listing returns it twice. Counted twice it is an "extra metering event" and
    credits a whole billed hour that was metered once."""
    monkeypatch.setattr(polar_module, "PAGE_LIMIT", 10)
    _hourly(db, polar, customers=3, hours=6)  # 18 events: two pages of 10
    real_page = polar._page
    shifted = []

    def page_then_meter(req, items):
        resp = real_page(req, items)
        if req.path == "/v1/events/" and req.q("page", "1") == "1" and not shifted:
            # a new event, newest first: at the head of the listing
            new = polar.add_usage_event("c-00", EVENT, {"instance_id": "i-new", "start_time": "2026-10-31T23:00:00",
                                                        "end_time": "2026-11-01T00:00:00"})
            polar.events.remove(new)
            polar.events.insert(0, new)
            shifted.append(new)
        return resp
    monkeypatch.setattr(polar, "_page", page_then_meter)

    reports = asyncio.run(_with_inv(db_url, polar, lambda inv: check_all(inv, ["i-00", "i-01", "i-02"], PERIODS)))
    assert shifted, "the listing was not paged"
    assert all(r.sources["polar"] == "ok" for r in reports)
    assert [(r.result.instance.instance_id, r.result.credit_cents, [f.kind for f in r.result.findings])
            for r in reports] == [("i-00", 0, []), ("i-01", 0, []), ("i-02", 0, [])]


def _meter_after_first_page(monkeypatch, polar, n: int = 1) -> list[dict]:
    """After Polar serves a first page of events, `n` new events are metered (the newest)."""
    real_page = polar._page
    added: list[dict] = []

    def page_then_meter(req, items):
        resp = real_page(req, items)
        if req.path == "/v1/events/" and req.q("page", "1") == "1" and not added:
            for k in range(n):
                added.append(polar.add_usage_event("c-00", EVENT, {
                    "instance_id": "i-new", "start_time": f"2026-10-31T2{k}:00:00Z", "end_time": f"2026-10-31T2{k}:30:00Z"}))
        return resp
    monkeypatch.setattr(polar, "_page", page_then_meter)
    return added


@pytest.mark.parametrize("newcomers", [1, 3])
def test_events_metered_while_a_listing_is_paged_neither_repeat_nor_hide_the_ones_before(
        db, db_url, polar, monkeypatch, newcomers):
    """The pages after the first are read concurrently. Newest first (Polar's default) a new event
    shifts every later page: page 2 repeats page 1's last and the oldest fall past the last page
    page 1 announced. list_all keeps each id once and reads the pages later answers announce; the
    client also lists events oldest first, where new events land after the ones already listed.
    Either way every event there was when the listing began comes back, once."""
    monkeypatch.setattr(polar_module, "PAGE_LIMIT", 10)
    _hourly(db, polar, customers=3, hours=10)  # 30 events: three full pages of 10
    added = _meter_after_first_page(monkeypatch, polar, newcomers)
    listed_before, pages_asked = [], []

    async def listings(inv):
        customers = {"external_customer_id": ["c-00", "c-01", "c-02"], "name": EVENT}
        out = []
        for order in ({}, {"sorting": polar_module.EVENTS_OLDEST_FIRST}):  # Polar's default, then ours
            added.clear()  # new events while this listing is paged
            listed_before.append({e["id"] for e in polar.events})
            polar.server.requests.clear()
            out.append(await inv.polar.list_all("/v1/events/", {**customers, **order}))
            pages_asked.append(sorted(int(r.query["page"][0]) for r in polar.server.requests))
        return out

    default, ours = asyncio.run(_with_inv(db_url, polar, listings))
    for listed, before in ((default, listed_before[0]), (ours, listed_before[1])):
        ids = [e["id"] for e in listed]
        assert len(ids) == len(set(ids)) and before <= set(ids)
    # newest first, the oldest event fell past page 3: list_all read the page a later answer announced
    assert pages_asked[0] == [1, 2, 3, 4]
    assert pages_asked[1][:3] == [1, 2, 3]


# --- the multi-org org_days.sql against the single-org statement it replaced ----------------------------

_OLD_ORG_DAYS_SQL = (Path(__file__).parent / "data" / "attack6_org_days_34f3d41.sql").read_text()
DAY0 = datetime(2026, 10, 3, tzinfo=timezone.utc)


async def _old_org_intervals(conn, org_id, days, limit):
    """Database.org_intervals as it was at 34f3d41 (one org per statement)."""
    if not days:
        return []
    cur = conn.cursor(row_factory=psycopg.rows.tuple_row)
    whole = timedelta(days=1)
    pending = {d: min(ORG_DAY_FIRST_BOUND, whole) for d in sorted(set(days))}
    out = []
    while pending:
        await cur.execute(_OLD_ORG_DAYS_SQL, {"org": org_id, "days": list(pending),
                                              "bounds": [d + b for d, b in pending.items()], "limit": limit},
                          prepare=False)
        passed = set()
        for lo, instance_id, s, e in await cur.fetchall():
            passed.add(lo)
            out.append(OrgInterval(instance_id, 0, s, e))
        pending = {d: min(b * 2, whole) for d, b in pending.items() if b < whole and to_us(d) not in passed}
    return out


def _insert(db, rid, iid, org, cust, s, e, period=None):
    db.execute("INSERT INTO billing_records (id, customer_id, org_id, instance_id, tier, rate_per_hour, hours_used,"
               " total_charge, billing_period, start_time, end_time) VALUES (%s,%s,%s,%s,'gpu',2.08,1,2.08,%s,%s,%s)",
               (rid, cust, org, iid, period or s.strftime("%Y-%m"), s, e))


def _random_org_days(db, rng):
    """Orgs sharing the statement, each with its own limit (zero, tiny, ordinary, never reached)
    and days (some without records); instances with exact duplicates, overlaps, records crossing
    midnight, longer than a day (the GiST branch), of no length, and one instance billed under
    two orgs."""
    limits = [timedelta(0), timedelta(seconds=1), timedelta(hours=1), timedelta(hours=3), timedelta(hours=7),
              timedelta(hours=20), timedelta(hours=40), timedelta(days=30)]
    orgs = [f"o-{n}" for n in range(rng.randrange(2, 6))]
    rid = 1
    for org in orgs:
        for k in range(rng.randrange(1, 5)):
            iid = f"i-{org}-{k}" if rng.random() < 0.85 else "i-shared"
            t = DAY0 + timedelta(minutes=rng.randrange(0, 3 * 24 * 60), microseconds=rng.choice([0, 0, 123457]))
            for _ in range(rng.randrange(1, 12)):
                length = rng.choice([timedelta(0), timedelta(minutes=1), timedelta(minutes=30), timedelta(hours=2),
                                     timedelta(hours=5), timedelta(hours=20), timedelta(hours=30),
                                     timedelta(hours=52), timedelta(seconds=7, microseconds=5)])
                _insert(db, rid, iid, org, "c-x", t, t + length)
                rid += 1
                if rng.random() < 0.15:  # an exact duplicate
                    _insert(db, rid, iid, org, "c-x", t, t + length)
                    rid += 1
                elif rng.random() < 0.15:  # an overlap
                    _insert(db, rid, iid, org, "c-x", t + length / 2, t + length * 2)
                    rid += 1
                t += length + rng.choice([timedelta(0), timedelta(seconds=30), timedelta(hours=3), -length / 3])
    all_days = [DAY0 + timedelta(days=n) for n in range(-2, 8)]
    return {org: (rng.sample(all_days, rng.randrange(0, len(all_days))), rng.choice(limits)) for org in orgs}


@pytest.mark.parametrize("seed", range(8))
def test_many_orgs_in_one_statement_read_what_each_org_alone_read(db, db_url, seed):
    rng = random.Random(6000 + seed)
    wanted = _random_org_days(db, rng)

    async def go():
        dbx = await Database.connect(db_url)
        try:
            async with dbx.snapshot() as conn:
                old = {o: await _old_org_intervals(conn, o, days, lim) for o, (days, lim) in wanted.items()}
                new = await dbx.org_intervals_of(conn, wanted)
                one = {o: await dbx.org_intervals(conn, o, days, lim) for o, (days, lim) in wanted.items()}
            return old, new, one
        finally:
            await dbx.close()

    old, new, one = asyncio.run(go())
    assert set(new) == set(wanted)
    for org in wanted:
        assert sorted(new[org], key=repr) == sorted(old[org], key=repr), org
        assert sorted(one[org], key=repr) == sorted(old[org], key=repr), org


def test_org_days_random_data_reach_the_limit(db, db_url):
    """The property above is not empty: on its data, days pass their limits (zero included)."""
    passed = zero = 0
    for seed in range(8):
        rng = random.Random(6000 + seed)
        db.execute("TRUNCATE billing_records")
        wanted = _random_org_days(db, rng)

        async def go():
            dbx = await Database.connect(db_url)
            try:
                async with dbx.snapshot() as conn:
                    return await dbx.org_intervals_of(conn, wanted)
            finally:
                await dbx.close()
        got = asyncio.run(go())
        passed += sum(1 for v in got.values() if v)
        zero += sum(1 for o, v in got.items() if v and wanted[o][1] == timedelta(0))
    assert passed >= 6 and zero >= 1


# --- records_of, evidence_fingerprints, held_pieces_of against the per-instance statements ------------

async def _old_fingerprint(conn, s, instance_id, org_id, periods):
    """store.evidence_fingerprint as it was at 34f3d41 (one instance per statement)."""
    credited = f"""(SELECT string_agg(concat_ws(':', p.case_id, p.record_id, p.start_us, p.end_us, p.extra_events),
                                     ',' ORDER BY p.case_id, p.record_id, p.start_us, p.extra_events)
                    FROM {s}.case_pieces p JOIN {s}.cases c ON c.id = p.case_id AND c.state = 'issued'
                    JOIN billing_records r ON r.id = p.record_id AND r.billing_period = ANY(%(periods)s)
                                           AND r.instance_id = %(i)s
                    WHERE %(i)s = ANY(c.instance_ids))"""
    recs = store._RECORDS_FOR_PERIODS.replace("{columns}", (
        "r.id, r.end_time, row(r.id, r.org_id, r.customer_id, r.tier, r.rate_per_hour, r.hours_used,"
        " r.total_charge, r.billing_period, r.start_time, r.end_time)::text AS t"))
    cur = await conn.execute(
        f"""WITH recs AS (SELECT * FROM ({recs}) x)
            SELECT md5(concat_ws('|',
              (SELECT row(i.instance_id, i.org_id, i.customer_id, i.tier, i.status, i.created_at, i.started_at,
                          i.stopped_at, CASE WHEN i.last_heartbeat >= (SELECT max(end_time) FROM recs) THEN NULL
                                             ELSE i.last_heartbeat END)::text
               FROM instances i WHERE i.instance_id = %(i)s),
              (SELECT string_agg(t, ',' ORDER BY id) FROM recs),
              (SELECT row(t.*)::text FROM throttle_settings t WHERE t.org_id = %(o)s),
              {credited})) AS fp""",
        {"i": instance_id, "o": org_id, "periods": sorted(periods), "instance": instance_id,
         "gap": timedelta(seconds=60)}, prepare=False)
    return (await cur.fetchone())["fp"]


async def _old_held(conn, s, instance_id, exclude_case):
    """store.held_pieces as it was at 34f3d41."""
    cur = await conn.execute(
        f"SELECT p.case_id, p.record_id, p.start_us, p.end_us, p.extra_events"
        f" FROM {s}.case_pieces p JOIN {s}.cases c ON c.id = p.case_id"
        f" JOIN billing_records r ON r.id = p.record_id AND r.instance_id = %s"
        f" WHERE %s = ANY(c.instance_ids) AND c.state = ANY(%s) AND c.id IS DISTINCT FROM %s",
        (instance_id, instance_id, list(HOLDING), exclude_case))
    covers = [PriorCover(r["case_id"], r["record_id"], r["start_us"], r["end_us"], r["extra_events"])
              for r in await cur.fetchall()]
    cur = await conn.execute(
        f"SELECT c.id, c.state, CASE WHEN c.state = 'issued' THEN c.issued_cents ELSE c.credit_cents END AS cents,"
        f" c.kinds, c.issued_at FROM {s}.cases c"
        f" WHERE %s = ANY(c.instance_ids) AND c.state = ANY(%s) AND c.id IS DISTINCT FROM %s ORDER BY c.id",
        (instance_id, list(HOLDING), exclude_case))
    cases = [PriorCase(r["id"], r["cents"] or 0, tuple(r["kinds"] or ()),
                       None if r["issued_at"] is None else to_us(r["issued_at"]), r["state"])
             for r in await cur.fetchall()]
    return covers, cases


def _random_histories(db, rng):
    """Instances (some with no instances row) with long histories: runs crossing from September
    into October and from October into November, gaps just over and under the run gap, duplicates
    and overlaps; throttle rows for some orgs."""
    ids = [f"i-h{n}" for n in range(rng.randrange(3, 8))]
    orgs = {i: rng.choice(["o-1", "o-2", "o-3"]) for i in ids}
    for o in ("o-1", "o-2"):
        if rng.random() < 0.7:
            db.execute("INSERT INTO throttle_settings VALUES (%s, '8 hours', '20 hours', NULL) ON CONFLICT DO NOTHING",
                       (o,))
    rid = 1
    for i in ids:
        if rng.random() < 0.8:
            hb = datetime(2026, 10, rng.randrange(1, 31), tzinfo=timezone.utc) if rng.random() < 0.5 else None
            db.execute("INSERT INTO instances VALUES (%s,%s,'c-h','gpu','running',%s,%s,NULL,%s)",
                       (i, orgs[i], datetime(2026, 8, 1, tzinfo=timezone.utc), datetime(2026, 8, 1, tzinfo=timezone.utc),
                        hb))
        t = datetime(2026, 9, rng.randrange(20, 31), rng.randrange(24), tzinfo=timezone.utc)
        for _ in range(rng.randrange(5, 60)):
            length = timedelta(minutes=rng.choice([10, 60, 60, 180, 600, 2000]))
            org = orgs[i] if rng.random() < 0.95 else "o-9"
            _insert(db, rid, i, org, "c-h", t, t + length, period=(t.strftime("%Y-%m") if rng.random() < 0.9
                                                                   else rng.choice(["2026-09", "2026-10", "2026-11"])))
            rid += 1
            if rng.random() < 0.1:
                _insert(db, rid, i, org, "c-h", t, t + length)
                rid += 1
            t += length + rng.choice([timedelta(0), timedelta(seconds=59), timedelta(seconds=61), timedelta(hours=2),
                                      timedelta(days=3)])
    return ids, orgs, rid


def _random_cases(db, s, rng, ids):
    """Cases over one instance and over several (a customer's, a batch's), in every state, with
    pieces of their instances' records (and one piece of a record of an instance the case does
    not list, which must not count for that instance)."""
    recs = db.execute("SELECT id, instance_id, (extract(epoch FROM start_time) * 1000000)::bigint,"
                      " (extract(epoch FROM end_time) * 1000000)::bigint FROM billing_records ORDER BY id").fetchall()
    case_ids = []
    for _ in range(rng.randrange(2, 7)):
        members = rng.sample(ids, rng.choice([1, 1, 2, 3]))
        state = rng.choice(["pending", "approved", "issuing", "issued", "rejected", "failed", "expired"])
        (cid,) = db.execute(
            f"INSERT INTO {s}.cases (instance_id, org_id, customer_id, periods, state, proposed_cents, credit_cents,"
            f" issued_cents, issued_at, required_level, kinds, report, requested_by, instance_ids)"
            f" VALUES (%s, %s, 'c-h', %s, %s, 500, 400, %s, %s, 1, %s, '{{}}', 'U1', %s) RETURNING id",
            (members[0] if len(members) == 1 else None, "o-1" if len(members) == 1 else None, PERIODS, state,
             300 if state == "issued" else None, datetime(2026, 11, 2, tzinfo=timezone.utc) if state == "issued" else None,
             ["duplicate_charge"], members)).fetchone()
        case_ids.append(cid)
        mine = [r for r in recs if r[1] in members]
        others = [r for r in recs if r[1] not in members]
        for rid, _, rs, re_ in rng.sample(mine, min(len(mine), rng.randrange(1, 6))) + (rng.sample(others, 1) if others else []):
            db.execute(f"INSERT INTO {s}.case_pieces VALUES (%s, 'duplicate_charge', %s, %s, %s, %s)",
                       (cid, rid, rs, rs + (re_ - rs) // 2, rng.choice([0, 1])))
    return case_ids


@pytest.mark.parametrize("seed", range(8))
def test_chunk_reads_are_each_instances_own(db, db_url, seed):
    rng = random.Random(7100 + seed)
    ids, orgs, _ = _random_histories(db, rng)
    periods = rng.choice([["2026-10"], ["2026-09", "2026-10"], ["2026-11"], ["2026-10", "2026-11"]])

    async def migrate():
        dbx = await Database.connect(db_url)
        try:
            await CaseStore(dbx).migrate()
            return dbx.schema
        finally:
            await dbx.close()
    s = asyncio.run(migrate())
    case_ids = _random_cases(db, s, rng, ids)

    async def go():
        dbx = await Database.connect(db_url)
        try:
            exclude = rng.choice(case_ids + [None])
            asked = ids + ["i-nothing"]  # an instance nobody billed: no records, a fingerprint all the same
            pairs = [(i, orgs.get(i, "o-1")) for i in asked]
            async with dbx.snapshot() as conn:
                many = await dbx.records_of(conn, asked, periods)
                one = {i: await dbx.records(conn, i, periods) for i in asked}
                fps = await store.evidence_fingerprints(conn, s, pairs, periods)
                old_fps = {i: await _old_fingerprint(conn, s, i, o, periods) for i, o in pairs}
                single_fp = {i: await store.evidence_fingerprint(conn, s, i, o, periods) for i, o in pairs}
                held = await store.held_pieces_of(conn, s, asked, exclude)
                old_held = {i: await _old_held(conn, s, i, exclude) for i in asked}
                combined = await store.evidence_fingerprint_of(conn, s, pairs[:3], periods)
            return many, one, fps, old_fps, single_fp, held, old_held, combined
        finally:
            await dbx.close()

    many, one, fps, old_fps, single_fp, held, old_held, combined = asyncio.run(go())
    assert any(one.values()) and any(h[0] for h in old_held.values()) and any(h[1] for h in old_held.values())
    for i in one:
        assert many[i] == one[i], i
        assert fps[i] == old_fps[i] == single_fp[i], i
        assert sorted(held[i][0], key=repr) == sorted(old_held[i][0], key=repr), i
        assert held[i][1] == old_held[i][1], i
    pairs3 = sorted((i, orgs.get(i, "o-1")) for i in (ids + ["i-nothing"])[:3])
    assert combined == store.combine_fingerprints(f"{i}={old_fps[i]}" for i, _ in pairs3)
    assert len(set(old_fps.values())) == len(old_fps)  # different instances, different evidence


# --- a listing failing or timing out: every customer of it shows Polar not read -----------------------

def _meter_twice_first_hour(db, polar):
    """Each instance's first hour metered a second time: read, Polar's events give a finding."""
    for rid, cust, iid, s, e in db.execute("SELECT DISTINCT ON (instance_id) id, customer_id, instance_id, start_time,"
                                           " end_time FROM billing_records ORDER BY instance_id, id").fetchall():
        polar.add_usage_event(cust, EVENT, {"instance_id": iid, "start_time": s.isoformat(),
                                            "end_time": e.isoformat(), "record_id": str(rid)})


def test_a_failed_or_slow_listing_leaves_each_of_its_customers_partial(db, db_url, polar, monkeypatch, caplog):
    import logging
    import threading

    from .fakes.http import Response
    _hourly(db, polar, customers=6, hours=3)
    _meter_twice_first_hour(db, polar)
    monkeypatch.setattr(investigation, "EVENTS_PER_LISTING", 2)
    monkeypatch.setattr(multi_check, "CHUNK", 2)
    real = polar.handle
    release = threading.Event()

    def handle(req):
        asked = req.query.get("external_customer_id", [])
        if req.path == "/v1/events/" and len(asked) > 1 and "c-02" in asked:
            return Response(500, {"error": "InternalServerError", "detail": "boom"})
        if req.path == "/v1/events/" and len(asked) > 1 and "c-04" in asked:
            release.wait(10)  # answers only after its checks gave up on it
        return real(req)
    monkeypatch.setattr(polar.server, "handler", handle)
    ids = [f"i-{n:02d}" for n in range(6)]

    async def body(inv):
        singles = {i: await inv.check(i, PERIODS) for i in ids}
        monkeypatch.setattr(investigation, "SOURCE_TIMEOUT_S", 1.0)
        many = await check_all(inv, ids, PERIODS)
        release.set()
        await asyncio.sleep(0.3)  # the slow listing ends, nobody waiting for it
        return singles, many

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        singles, many = asyncio.run(_with_inv(db_url, polar, body))
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    by = {r.result.instance.instance_id: r for r in many}
    for i in ids:
        assert singles[i].sources["polar"] == "ok"
        assert [f.kind for f in singles[i].result.findings] == ["duplicate_charge"]
    for i in ("i-02", "i-03", "i-04", "i-05"):
        failed = by[i].sources["polar"]
        assert failed.startswith("failed: usage events: "), (i, failed)
        assert ("timed out" in failed) == (i in ("i-04", "i-05")), failed
        assert by[i].coverage.state == "partial" and "duplicate_charge" in by[i].coverage.kinds
        assert any("not read" in w for w in by[i].coverage.why)
        assert by[i].result.credit_cents == 0
    for i in ("i-00", "i-01"):
        assert by[i].sources == singles[i].sources
        assert [f.kind for f in by[i].result.findings] == ["duplicate_charge"]
        assert by[i].result.credit_cents == singles[i].result.credit_cents > 0


# --- a chunk failing half way ------------------------------------------------------------------------

def test_a_chunk_failing_half_way_fails_the_check_and_leaves_nothing_behind(db, db_url, polar, monkeypatch, caplog):
    """A database error in one chunk (after its Kubernetes and Polar reads started): the whole
    check fails with it (no partial answer), the other chunks' connections go back to the pool, no
    task's failure is left unretrieved, and the same Investigator then checks every instance."""
    import logging

    _hourly(db, polar, customers=6, hours=3)
    _meter_twice_first_hour(db, polar)
    monkeypatch.setattr(multi_check, "CHUNK", 2)
    monkeypatch.setattr(investigation, "EVENTS_PER_LISTING", 1)
    ids = [f"i-{n:02d}" for n in range(6)]
    real = investigation.held_pieces_of
    calls = []

    async def flaky(conn, s, instance_ids, exclude_case=None):
        calls.append(list(instance_ids))
        if "i-02" in instance_ids:
            await conn.execute("SELECT 1/0")  # a real database error, in the chunk's transaction
        return await real(conn, s, instance_ids, exclude_case)

    async def body(inv):
        monkeypatch.setattr(investigation, "held_pieces_of", flaky)
        with pytest.raises(Exception) as failed:
            await check_all(inv, ids, PERIODS)
        for _ in range(60):  # the other chunks end, their connections return
            stats = inv.db.pool.get_stats()
            if stats.get("pool_size", 0) == stats.get("pool_available", 0):
                break
            await asyncio.sleep(0.05)
        monkeypatch.setattr(investigation, "held_pieces_of", real)
        again = await check_all(inv, ids, PERIODS)
        singles = {i: await inv.check(i, PERIODS) for i in ids}
        return failed.value, stats, again, singles

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        err, stats, again, singles = asyncio.run(_with_inv(db_url, polar, body))
    assert "division by zero" in str(err)
    assert stats.get("pool_size", 0) == stats.get("pool_available", 0), stats
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage() or "destroyed" in r.getMessage()]
    assert [r.result.instance.instance_id for r in again] == ids
    for r in again:
        s = singles[r.result.instance.instance_id]
        assert (r.result.credit_cents, r.sources, r.fingerprint) == (s.result.credit_cents, s.sources, s.fingerprint)
        assert r.result.credit_cents > 0


def test_an_unknown_instance_in_a_chunk_is_named(db, db_url, polar):
    _hourly(db, polar, customers=2, hours=2)

    async def body(inv):
        with pytest.raises(investigation.UnknownInstance) as e:
            await inv.check_many(["i-00", "i-zz", "i-01"], PERIODS)
        return str(e.value)
    assert "i-zz" in asyncio.run(_with_inv(db_url, polar, body))


def test_429s_during_paged_listings_change_no_answer(db, db_url, polar, monkeypatch):
    """Listings of several customers, paged (pages fetched concurrently), with every third request
    of any kind answered 429: the same reports as without, Polar read for every instance."""
    monkeypatch.setattr(polar_module, "PAGE_LIMIT", 4)
    monkeypatch.setattr(investigation, "EVENTS_PER_LISTING", 3)
    monkeypatch.setattr(multi_check, "CHUNK", 2)
    _hourly(db, polar, customers=6, hours=5)
    _meter_twice_first_hour(db, polar)
    ids = [f"i-{n:02d}" for n in range(6)]

    async def body(inv):
        calm = await check_all(inv, ids, PERIODS)
        polar.rate_limit(3, "0")
        busy = await check_all(inv, ids, PERIODS)
        polar.rate_limit(0)
        return calm, busy

    # every third request of any kind refused: with 4 attempts a request fails all of them about
    # once in 81 (the listings' requests interleave), and then Polar honestly counts as not read;
    # 12 attempts keep that out of a test about the answers after retried 429s
    calm, busy = asyncio.run(_with_inv(db_url, polar, body, attempts=12))
    assert polar.rate_limited and any(route == "/v1/events/" for _, route in polar.rate_limited)
    assert [(r.result.instance.instance_id, r.result.credit_cents, r.sources) for r in busy] == \
           [(r.result.instance.instance_id, r.result.credit_cents, r.sources) for r in calm]
    assert all(r.sources["polar"] == "ok" and r.result.credit_cents > 0 for r in busy)


def test_a_failed_chunk_stops_the_chunks_not_yet_done(db, db_url, polar, monkeypatch):
    """A plan over 20,000 instances is 80 chunks: when one fails, the check has failed, and the
    chunks not yet done must not go on reading the database and Polar for minutes in the
    background (nobody will read their answer; a retry would double the load)."""
    _hourly(db, polar, customers=10, hours=1)
    monkeypatch.setattr(multi_check, "CHUNK", 1)
    monkeypatch.setattr(multi_check, "CHUNKS_AT_ONCE", 2)
    ids = [f"i-{n:02d}" for n in range(10)]
    started, handed = [], []
    real = Investigator.check_many

    async def slow_check_many(self, chunk, *a, **kw):
        started.append(chunk[0])
        if chunk[0] == "i-01":
            raise RuntimeError("a chunk failed")
        await asyncio.sleep(0.1)
        return await real(self, chunk, *a, **kw)
    monkeypatch.setattr(Investigator, "check_many", slow_check_many)

    async def body(inv):
        with pytest.raises(RuntimeError):
            await check_all(inv, ids, PERIODS, on_report=lambda r: handed.append(r.result.instance.instance_id))
        at_failure = len(started)
        await asyncio.sleep(1.0)
        return at_failure

    at_failure = asyncio.run(_with_inv(db_url, polar, body))
    assert len(started) == at_failure <= 3, started
    assert len(handed) < len(ids)


# --- cases opened while a chunked check reads ----------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_cases_opened_concurrently_over_chunked_checks_credit_each_second_once(db, db_url, polar, monkeypatch, seed):
    """Instance cases, customer cases and an org case of the same time opened at once, the
    customer and org checks read a chunk of one instance per snapshot (so a case can be opened
    between two chunks of one check): the holding cases' pieces never overlap, and together they
    credit exactly what the instances' own checks found."""
    from services.cases import CheckRequest

    from .test_remediation_batch import World, seed_customers
    seed_customers(db, polar, n=2, instances_each=3)
    monkeypatch.setattr(multi_check, "CHUNK", 1)
    rng = random.Random(seed)

    async def go():
        async with World(db_url, polar) as w:
            svc = w.service
            ids = [f"i-{c:02d}-{k}" for c in range(2) for k in range(3)]
            full = {i: (await svc.investigator.check(i, PERIODS)).result.credit_cents for i in ids}
            jobs = [svc.open(CheckRequest(i, PERIODS, "U1")) for i in rng.sample(ids, 3)]
            jobs += [svc.open_customer("c-00", CheckRequest("", PERIODS, "U1")),
                     svc.open_customer("c-01", CheckRequest("", PERIODS, "U1")),
                     svc.open_org("o-00", CheckRequest("", PERIODS, "U1"))]
            rng.shuffle(jobs)
            await asyncio.gather(*jobs)
            # a second round: everything is held now, nothing new is credited
            again = await svc.open_customer("c-00", CheckRequest("", PERIODS, "U1"))
            return full, again

    full, again = asyncio.run(go())
    with psycopg.connect(db_url) as conn:
        cases = conn.execute("SELECT id, credit_cents, instance_ids FROM billing_bot.cases"
                             " WHERE state NOT IN ('rejected', 'expired')").fetchall()
        pieces = conn.execute("SELECT p.case_id, p.record_id, p.start_us, p.end_us, p.extra_events"
                              " FROM billing_bot.case_pieces p JOIN billing_bot.cases c ON c.id = p.case_id"
                              " WHERE c.state NOT IN ('rejected', 'expired') ORDER BY 2, 3").fetchall()
    assert len(cases) >= 2 and pieces
    for a, b in zip(pieces, pieces[1:]):
        if a[1] == b[1]:
            assert a[3] <= b[2] or (a[2] == b[2] == a[3] == b[3]), (a, b)  # no second credited twice
    assert sum(c[1] for c in cases) == sum(full.values()) > 0
    assert all(o.status in ("existing", "done") for o in again)
    assert all(o.status == "existing" or o.case.credit_cents == 0 for o in again)
