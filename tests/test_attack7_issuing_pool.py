"""Attack 7: the issuing workers' own connection pool (Database.worker_pool, 12 workers by default).

Two replicas of 12 workers each, their sweepers and Polar faults on the same cases; a worker's
connection killed while its refund POST is in Polar; the main pool exhausted while workers re-check;
the workers sharing a pool of 8 (Database(pool)); the pool fitted by many workers at once; the
database closed under running workers; bad BILLING_BOT_ISSUING_WORKERS values. Each asserts: every
customer refunded exactly its case's credit, once; no case left approved or issuing; no advisory
lock held afterwards."""
import asyncio
import time
from datetime import datetime, timezone

import psycopg
import pytest

from services.cases import CaseService, CheckRequest
from services.config import ConfigError, Env
from services.db import Database, make_pool
from services.investigation import Investigator
from services.issuing import Issuer
from services.polar import PolarClient
from services.store import CaseStore

from .fakes.polar_server import TOKEN
from .seed import instance, record
from .test_issuing import CONFIG, Recorder, authority


def seed(db, polar, n: int) -> None:
    """n customers, each with one instance billed twice for the same October hour (208 cents)."""
    for c in range(n):
        cust, iid = f"c-{c:03d}", f"i-{c:03d}"
        polar.add_customer(cust, email=f"{cust}@example.com", name=f"Customer {c}")
        polar.add_order(cust, datetime(2026, 11, 1, 0, 5, tzinfo=timezone.utc), 100_00)
        instance(db, iid, org=f"o-{c:03d}", customer=cust, tier="gpu")
        for k in range(2):
            record(db, 2 * c + k + 1, iid, "2026-10-05 08:00", "2026-10-05 09:00", "2.08", org=f"o-{c:03d}",
                   customer=cust)


class Replica:
    def __init__(self, db_url, polar, workers=12, db: Database | None = None, **issuer_kw):
        self.db_url, self.polar, self.workers, self.db, self.issuer_kw = db_url, polar, workers, db, issuer_kw

    async def __aenter__(self):
        if self.db is None:
            self.db = await Database.connect(self.db_url, issuing_workers=self.workers)
        self.service = CaseService(CaseStore(self.db), Investigator(CONFIG, self.db), CONFIG, authority)
        await self.service.store.migrate()
        self.client = PolarClient(self.polar.url, TOKEN, backoff=0.02)
        self.rec = Recorder()
        self.issuer = Issuer(self.service, self.client, CONFIG, self.rec, lookup_delay_s=0.02,
                             workers=self.workers, **self.issuer_kw)
        self.service.issuer = self.issuer
        return self

    async def __aexit__(self, *exc):
        await self.issuer.drain(30)
        await self.client.close()
        await self.db.close()

    async def open_all(self, n: int) -> list[int]:
        ids = []
        for c in range(n):
            out = await self.service.open(CheckRequest(f"i-{c:03d}", ["2026-10"], "U1"))
            assert out.case is not None and out.case.credit_cents == 208, out
            ids.append(out.case.id)
        return ids


def rows(db_url, sql, args=()):
    with psycopg.connect(db_url) as conn:
        return conn.execute(sql, args).fetchall()


def advisory_locks(db_url) -> list:
    return rows(db_url, "SELECT pid, objid FROM pg_locks WHERE locktype = 'advisory'")


def assert_each_case_refunded_once(db_url, polar, n: int) -> None:
    states = dict(rows(db_url, "SELECT state, count(*) FROM billing_bot.cases GROUP BY 1"))
    assert states == {"issued": n}, states
    cases = rows(db_url, "SELECT id, customer_id, credit_cents, issued_cents FROM billing_bot.cases")
    by_order = {o["id"]: o["_external_customer_id"] for o in polar.orders}
    for case_id, customer, credit, issued in cases:
        mine = [r for r in polar.refunds if r["metadata"].get("case_id") == str(case_id)]
        assert len(mine) == 1, (case_id, mine)
        assert mine[0]["status"] == "succeeded" and mine[0]["amount"] == credit == issued, (case_id, mine)
        assert by_order[mine[0]["order_id"]] == customer
    assert len(polar.refunds) == n
    assert rows(db_url, "SELECT count(*) FROM billing_corrections")[0][0] == n
    assert advisory_locks(db_url) == []


async def settle(*replicas: Replica, rounds: int = 20) -> None:
    """Drain the workers; resume what is left (cases a fault failed are retried by a lead)."""
    for _ in range(rounds):
        for r in replicas:
            await r.issuer.drain(30)
        a = replicas[0]
        await a.issuer.resume_unfinished(older_than_s=0)
        failed = [i for (i,) in rows(a.db_url, "SELECT id FROM billing_bot.cases WHERE state = 'failed'")]
        for case_id in failed:
            out = await a.service.retry(case_id, "U_LEAD")
            assert out.ok, out
        await a.issuer.drain(30)
        left = rows(a.db_url, "SELECT count(*) FROM billing_bot.cases WHERE state <> 'issued' OR NOT notified")
        if left[0][0] == 0:
            return
        await asyncio.sleep(0.2)


def test_two_replicas_of_twelve_workers_and_their_sweepers_refund_each_case_once_under_faults(db, db_url, polar):
    """60 cases approved on replica A (its 12 workers issue them) while replica B submits every one
    of them to its own 12 workers and both sweepers resume at once; Polar drops answers after making
    the refund, answers 500 and 429."""
    n = 60
    seed(db, polar, n)
    polar.fail("POST", "/v1/refunds/", kind="drop_after", times=8)
    polar.fail("POST", "/v1/refunds/", kind="status", status=500, times=6)
    polar.fail("POST", "/v1/refunds/", kind="status", status=429, retry_after="0", times=6)

    async def go():
        async with Replica(db_url, polar) as a, Replica(db_url, polar) as b:
            ids = await a.open_all(n)
            polar.rate_limit(17, retry_after="0")

            async def approve_all():
                for case_id in ids:
                    out = await a.service.approve(case_id, "U_LEAD", "refund")
                    assert out.ok, out

            async def replica_b():
                for case_id in ids:
                    await b.issuer.submit(case_id)
                    await asyncio.sleep(0)

            async def sweepers():
                for _ in range(5):
                    await asyncio.gather(a.issuer.resume_unfinished(0), b.issuer.resume_unfinished(0))
                    await asyncio.sleep(0.05)

            await asyncio.gather(approve_all(), replica_b(), sweepers())
            polar.rate_limit(0)
            await settle(a, b)
            for r in (a, b):  # each worker pool within its size, all connections back
                stats = r.db.worker_pool.get_stats()
                assert stats["pool_size"] <= 13 and stats.get("requests_errors", 0) == 0, stats
    asyncio.run(go())
    assert_each_case_refunded_once(db_url, polar, n)


def hold_refund_posts(polar):
    """The refund POSTs wait at Polar (before the refund is made) until `gate` is set; `entered` is
    set when the first one arrives."""
    import threading

    entered, gate = threading.Event(), threading.Event()
    real = polar.server.handler

    def handler(req):
        if req.method == "POST" and req.path.rstrip("/") == "/v1/refunds":
            entered.set()
            gate.wait(20)
        return real(req)
    polar.server.handler = handler
    return entered, gate


async def lock_holder(db_url, case_id: int, timeout_s: float = 5.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        held = rows(db_url, "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = 7242002"
                            " AND objid = %s AND granted", (case_id,))
        if held:
            return held[0][0]
        await asyncio.sleep(0.02)
    raise AssertionError(f"nobody holds case {case_id}'s lock")


def test_a_workers_connection_killed_while_its_refund_post_is_in_polar_gives_one_refund(db, db_url, polar):
    """Replica A's worker POSTs; its pooled connection is terminated while Polar makes the refund:
    the server releases the case's lock, replica B takes the case at once but posts nothing while
    the POST may still run; the refund lands, A cannot record it; B finds it and issues the case.
    A's workers' pool replaces the dead connection and issues the next case."""
    seed(db, polar, 2)
    entered, gate = hold_refund_posts(polar)

    async def go():
        async with Replica(db_url, polar, in_flight_window_s=1.0) as a, \
                Replica(db_url, polar, in_flight_window_s=1.0) as b:
            first, second = await a.open_all(2)
            assert (await a.service.approve(first, "U_LEAD", "refund")).ok
            await asyncio.to_thread(entered.wait, 10)
            pid = await lock_holder(db_url, first)
            assert rows(db_url, "SELECT pg_terminate_backend(%s)", (pid,))[0][0]
            while advisory_locks(db_url):  # the server released the dead session's lock
                await asyncio.sleep(0.02)
            posts = sum(1 for r in polar.server.requests if r.method == "POST" and "refunds" in r.path)
            left = await b.issuer.issue(first)  # the lock is free, but A's POST may still run
            assert left["state"] == "issuing"
            assert sum(1 for r in polar.server.requests if r.method == "POST" and "refunds" in r.path) == posts
            gate.set()  # Polar makes the refund and answers A, whose connection is gone
            await a.issuer.drain(10)
            assert len(polar.refunds) == 1
            await asyncio.sleep(1.1)  # past the in-flight window: the refund is looked up, found
            done = await b.issuer.issue(first)
            assert done["state"] == "issued" and done["issued_cents"] == 208
            assert (await a.service.approve(second, "U_LEAD", "refund")).ok
            await a.issuer.drain(10)
            assert (await a.service.store.get(second))["state"] == "issued"
            await settle(a, b)
    asyncio.run(go())
    assert_each_case_refunded_once(db_url, polar, 2)


async def approve_quietly(r: Replica, ids: list[int]) -> None:
    """Approved, not yet submitted (as if the process died right after the approvals)."""
    r.service.issuer = None
    try:
        for case_id in ids:
            assert (await r.service.approve(case_id, "U_LEAD", "refund")).ok
    finally:
        r.service.issuer = r.issuer


def bill_again(db, n: int, first_id: int = 10_000) -> None:
    """A third copy of each instance's hour: the evidence changed after the approval."""
    for c in range(n):
        record(db, first_id + c, f"i-{c:03d}", "2026-10-05 08:00", "2026-10-05 09:00", "2.08", org=f"o-{c:03d}",
               customer=f"c-{c:03d}")


def test_workers_rechecking_while_checks_hold_the_whole_main_pool_fail_no_case(db, db_url, polar):
    """The evidence of 16 approved cases changed; checks hold every connection of the pool of 8 past
    its wait: the 12 workers, each on its own pool's connection, wait for the re-check's snapshot,
    give up (PoolTimeout), and leave their cases approved, unlocked, no money moved. Once the pool
    is free they re-check; a new approval issues each once, at the new amount."""
    n = 16
    seed(db, polar, n)

    async def go():
        async with Replica(db_url, polar) as a:
            ids = await a.open_all(n)
            await approve_quietly(a, ids)
            bill_again(db, n)
            a.db.pool.timeout = 1.0  # POOL_WAIT_S, shortened
            held = [await a.db.pool.getconn() for _ in range(a.db.pool.max_size)]
            try:
                t0 = time.monotonic()
                for case_id in ids:
                    await a.issuer.submit(case_id)
                await a.issuer.drain(30)
                # 16 cases, 12 at once: two waves of one pool wait each, not a pile-up
                assert time.monotonic() - t0 < 4
                states = dict(rows(db_url, "SELECT state, count(*) FROM billing_bot.cases GROUP BY 1"))
                assert states == {"approved": n}, states
                assert advisory_locks(db_url) == [] and polar.refunds == [] and a.rec.failed_calls == []
                stats = a.db.worker_pool.get_stats()
                assert stats["pool_size"] <= 13 and stats["pool_available"] == stats["pool_size"], stats
            finally:
                for conn in held:
                    await a.db.pool.putconn(conn)
            await a.issuer.resume_unfinished(0)
            await a.issuer.drain(30)
            pending = rows(db_url, "SELECT id, credit_cents FROM billing_bot.cases WHERE state = 'pending'")
            assert len(pending) == n and {c for _, c in pending} == {416}, pending
            assert polar.refunds == [] and len(a.rec.rechecks) == n
            for case_id, _ in pending:
                assert (await a.service.approve(case_id, "U_LEAD", "refund")).ok
            await settle(a)
    asyncio.run(go())
    assert_each_case_refunded_once(db_url, polar, n)
    assert {r["amount"] for r in polar.refunds} == {416}


def test_twelve_workers_sharing_a_pool_of_eight_recheck_without_a_pool_deadlock(db, db_url, polar):
    """Database(pool) without the workers' pool: the 12 workers bind from the pool of 8. Each
    re-check needs a second connection (the snapshot) while the worker holds its bound one: were all
    8 bound, every worker would wait on the others until the pool's wait ran out, wave after wave."""
    n = 16
    seed(db, polar, n)

    async def go():
        pool = make_pool(db_url, max_size=8)
        await pool.open(wait=True)
        pool.timeout = 1.0  # POOL_WAIT_S, shortened: a pile-up shows as PoolTimeouts
        async with Replica(db_url, polar, db=Database(pool)) as a:
            ids = await a.open_all(n)
            await approve_quietly(a, ids)
            bill_again(db, n)
            for case_id in ids:
                await a.issuer.submit(case_id)
            await a.issuer.drain(30)
            states = dict(rows(db_url, "SELECT state, count(*) FROM billing_bot.cases GROUP BY 1"))
            assert states == {"pending": n}, states  # every one re-checked in its first run
            assert advisory_locks(db_url) == [] and polar.refunds == []
            for case_id in ids:
                assert (await a.service.approve(case_id, "U_LEAD", "refund")).ok
            await settle(a)
    asyncio.run(go())
    assert_each_case_refunded_once(db_url, polar, n)


def test_the_workers_pool_fitted_by_many_workers_at_once_ends_at_the_largest_size(db, db_url, polar):
    """Twelve workers of an issuer fit the workers' pool at their first use, all at once, and other
    issuers of the same database with other sizes too, while a checkout holds the pool's lock (the
    resizes then land in any order): the pool ends sized for the largest, never shrunk by a smaller
    one landing last; every case of the first burst is issued once."""
    n = 12
    seed(db, polar, n)

    async def go():
        db_ = await Database.connect(db_url, issuing_workers=3)
        async with Replica(db_url, polar, workers=12, db=db_) as a:
            ids = await a.open_all(n)
            await approve_quietly(a, ids)
            pool = db_.worker_pool
            others = [Issuer(a.service, a.client, CONFIG, Recorder(), workers=w) for w in (20, 16, 13, 18)]
            await pool._lock.acquire()  # a checkout in progress
            tasks = [asyncio.create_task(a.issuer.issue(i)) for i in ids]
            tasks += [asyncio.create_task(o.issue(999_999)) for o in others]
            await asyncio.sleep(0.05)
            pool._lock.release()
            await asyncio.gather(*tasks)
            assert pool.max_size == 21, pool.max_size
            await settle(a)
    asyncio.run(go())
    assert_each_case_refunded_once(db_url, polar, n)


@pytest.mark.parametrize("bad", ["0", "65", "-3", "+3", "1e3", "3 workers", "²", "٣", "9" * 5000, "0x10", "1_2"])
def test_a_bad_issuing_workers_value_is_a_config_error_naming_the_key(bad):
    """'²' and 5,000 digits pass str.isdigit() but not int(): a bare ValueError naming no key."""
    with pytest.raises(ConfigError, match="BILLING_BOT_ISSUING_WORKERS: expected a whole number from 1 to 64"):
        Env.from_environ({"BILLING_BOT_ISSUING_WORKERS": bad})
    if not bad.isdigit() or len(bad) > 5:
        with pytest.raises(ConfigError, match="PORT: expected a TCP port number"):
            Env.from_environ({"PORT": bad})
    assert Env.from_environ({"BILLING_BOT_ISSUING_WORKERS": " 7 "}).issuing_workers == 7


def test_no_secret_reaches_a_log_while_the_workers_pool_opens_grows_and_fails(db, db_url, polar, caplog):
    """The database password (in the URL), Polar's token: in no log record, at DEBUG, while the
    workers' pool is opened, resized, loses a connection and is closed."""
    import logging

    secret = "hunter2-s3cret"
    url = db_url + ("&" if "?" in db_url else "?") + f"password={secret}"
    seed(db, polar, 1)
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="psycopg")

    async def go():
        async with Replica(url, polar, workers=3, db=await Database.connect(url, issuing_workers=1)) as a:
            (case_id,) = await a.open_all(1)
            await approve_quietly(a, [case_id])
            async with a.db.worker_pool.connection() as conn:  # a pooled connection, then killed
                rows(db_url, "SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
            await a.issuer.issue(case_id)
    asyncio.run(go())
    text = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "resizing 'issuing'" in text
    assert secret not in text and TOKEN not in text
    assert_each_case_refunded_once(db_url, polar, 1)


def test_the_database_closed_under_running_workers_strands_no_case_and_pays_none_twice(db, db_url, polar):
    """30 cases submitted to 12 workers; while 12 refund POSTs wait at Polar the database (both
    pools) is closed: the running workers finish on the connections they hold, the queued ones find
    the pool closed and leave their cases approved; another replica resumes every one, once."""
    n = 30
    seed(db, polar, n)
    entered, gate = hold_refund_posts(polar)

    async def go():
        async with Replica(db_url, polar) as b:
            a = Replica(db_url, polar)
            await a.__aenter__()
            ids = await a.open_all(n)
            await approve_quietly(a, ids)
            for case_id in ids:
                await a.issuer.submit(case_id)
            await asyncio.to_thread(entered.wait, 10)
            while sum(1 for r in polar.server.requests if r.method == "POST") < 12:
                await asyncio.sleep(0.02)
            closing = asyncio.create_task(a.db.close())
            await asyncio.sleep(0.2)
            gate.set()
            await closing
            await a.issuer.drain(30)
            await a.client.close()
            assert a.db.pool.closed and a.db.worker_pool.closed
            states = dict(rows(db_url, "SELECT state, count(*) FROM billing_bot.cases GROUP BY 1"))
            assert states.get("failed", 0) == 0, states
            assert advisory_locks(db_url) == []
            await settle(b)
    asyncio.run(go())
    assert_each_case_refunded_once(db_url, polar, n)


def test_a_case_lock_never_goes_to_the_next_worker_with_the_pooled_connection(db, db_url, polar, monkeypatch):
    """One worker's connection in the workers' pool (issuing_workers=1), reused case after case;
    the unlock of each case is lost (a bug, a cancelled call): pg_advisory_unlock_all() on the way
    back still frees it, so the next worker on that connection holds only its own case, and the
    other replica can take every case at once."""
    n = 4
    seed(db, polar, n)
    unlocks = []

    async def lost_unlock(self, case_id):
        unlocks.append(case_id)
    monkeypatch.setattr(CaseStore, "unlock_case", lost_unlock)

    async def go():
        async with Replica(db_url, polar, workers=1, db=await Database.connect(db_url, issuing_workers=1)) as a, \
                Replica(db_url, polar) as b:
            ids = await a.open_all(n)
            await approve_quietly(a, ids)
            pids = set()
            for case_id in ids:
                async with a.service.store.bound() as conn:  # the connection the next worker gets
                    pids.add(conn.info.backend_pid)
                assert (await a.issuer.issue(case_id))["state"] == "issued"
                assert advisory_locks(db_url) == []
            assert len(pids) == 1 and unlocks == ids
            async with b.service.store.bound():
                for case_id in ids:
                    assert await b.service.store.try_lock_case(case_id)
    asyncio.run(go())
    assert_each_case_refunded_once(db_url, polar, n)
