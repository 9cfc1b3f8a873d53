"""The issuing workers' own connection pool (Database.worker_pool): a worker binds its connection
there (Store.bound), so issuing never takes the connections checks and Slack's listeners use, and
the session lock on the case still never goes back to a pool with the connection."""
import asyncio
from contextlib import AsyncExitStack

import psycopg
import pytest

from services import store as store_mod
from services.cases import CheckRequest
from services.config import ISSUING_WORKERS, ConfigError, Env
from services.db import Database, make_pool, worker_pool_size
from services.issuing import Issuer
from services.polar import PolarClient

from .fakes.polar_server import TOKEN
from .test_issuing import CONFIG, Recorder, orders, run, seed, service


def advisory_locks(db_url) -> list:
    with psycopg.connect(db_url) as conn:
        return conn.execute("SELECT objid FROM pg_locks WHERE locktype = 'advisory'").fetchall()


def test_a_case_is_issued_while_every_connection_of_the_main_pool_is_held(db, db_url, polar):
    """Checks and Slack's listeners hold all of the pool of 8 (here 2): an approved case is still
    issued, on the workers' own connections; the case's session lock is gone afterwards."""
    seed(db)
    orders(polar)

    async def go():
        db_ = await Database.connect(db_url, min_size=2, max_size=2, issuing_workers=2)
        client = PolarClient(polar.url, TOKEN, backoff=0.05)
        try:
            svc = service(db_)
            await svc.store.migrate()
            rec = Recorder()
            issuer = Issuer(svc, client, CONFIG, rec, lookup_delay_s=0.05, workers=2)
            opened = await svc.open(CheckRequest("i-7f3a", ["2026-10"], "U1", "T-1"))
            approved = await svc.approve(opened.case.id, "U_LEAD", "refund")
            assert approved.ok, approved
            assert db_.worker_pool.get_stats()["pool_size"] == 0  # opened lazily: no worker has run yet
            seen = {}
            real_try_lock = store_mod.CaseStore.try_lock_case

            async def spy(self, case_id):
                conn = store_mod._bound.get()
                seen["pid"] = conn.info.backend_pid
                return await real_try_lock(self, case_id)
            store_mod.CaseStore.try_lock_case = spy
            try:
                async with AsyncExitStack() as held:
                    main_pids = set()
                    for _ in range(db_.pool.max_size):  # the whole main pool, as busy checks would
                        conn = await held.enter_async_context(db_.pool.connection())
                        main_pids.add(conn.info.backend_pid)
                    # the main pool would make it wait POOL_WAIT_S (10 s) and fail: well before that
                    done = await asyncio.wait_for(issuer.issue(approved.case.id), 8)
            finally:
                store_mod.CaseStore.try_lock_case = real_try_lock
            assert seen["pid"] not in main_pids
            assert db_.worker_pool.get_stats()["pool_size"] >= 1
            return done, rec
        finally:
            await client.close()
            await db_.close()
    done, rec = run(go())
    assert done["state"] == "issued" and done["issued_cents"] == 1028
    assert len(polar.refunds) == 1 and rec.issued_calls
    assert advisory_locks(db_url) == []  # pool closed; and no lock went back with a pooled connection


def test_the_case_lock_is_released_before_the_workers_connection_goes_back(db, db_url, polar):
    """The same session-lock discipline on the workers' pool: after an issuing, the pooled
    connection it used holds no advisory lock (another worker then takes the case at once)."""
    seed(db)
    orders(polar)

    async def go():
        db_ = await Database.connect(db_url, issuing_workers=1)
        client = PolarClient(polar.url, TOKEN, backoff=0.05)
        try:
            svc = service(db_)
            await svc.store.migrate()
            issuer = Issuer(svc, client, CONFIG, Recorder(), lookup_delay_s=0.05, workers=1)
            opened = await svc.open(CheckRequest("i-7f3a", ["2026-10"], "U1", "T-1"))
            approved = await svc.approve(opened.case.id, "U_LEAD", "refund")
            async with svc.store.bound():  # another worker holds the case: the issuer leaves it
                assert await svc.store.try_lock_case(approved.case.id)
                assert await asyncio.create_task(issuer.issue(approved.case.id)) is None
            # the holder's connection went back to the workers' pool, its lock released first
            assert db_.worker_pool.get_stats()["pool_available"] >= 1
            async with db_.pool.connection() as conn:
                cur = await conn.execute("SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory'")
                assert (await cur.fetchone())["n"] == 0
            return await issuer.issue(approved.case.id)
        finally:
            await client.close()
            await db_.close()
    done = run(go())
    assert done["state"] == "issued"
    assert len(polar.refunds) == 1


def test_the_workers_pool_is_sized_to_the_workers_and_grows_with_an_issuer(db, db_url, polar):
    seed(db)
    orders(polar)

    async def go():
        db_ = await Database.connect(db_url, issuing_workers=3)
        client = PolarClient(polar.url, TOKEN, backoff=0.05)
        try:
            assert db_.pool.max_size == 8  # the main pool: unchanged
            assert db_.worker_pool.max_size == worker_pool_size(3) == 4  # a worker each, and the sweeper
            svc = service(db_)
            await svc.store.migrate()
            issuer = Issuer(svc, client, CONFIG, Recorder(), workers=6)
            await issuer.sweep_once(0)  # nothing to do, but the issuer has looked at its pool
            await issuer.issue(999_999)  # no such case
            assert db_.worker_pool.max_size == 7
            small = Issuer(svc, client, CONFIG, Recorder(), workers=2)
            await small.issue(999_999)
            assert db_.worker_pool.max_size == 7  # never shrunk under another issuer's workers
        finally:
            await client.close()
            await db_.close()
        assert db_.worker_pool.closed and db_.pool.closed
    run(go())


def test_without_a_workers_pool_the_bound_connection_comes_from_the_pool(db_url):
    """Database(pool), as some tests build it: the workers share the pool, as before."""
    async def go():
        pool = make_pool(db_url, max_size=2)
        await pool.open(wait=True)
        try:
            db_ = Database(pool)
            assert db_.worker_pool is None
            store = store_mod.CaseStore(db_)
            async with store.bound() as conn:
                assert store_mod._bound.get() is conn
                assert pool.get_stats()["pool_available"] + 1 == pool.get_stats()["pool_size"]
            await db_.fit_worker_pool(12)  # nothing to grow
        finally:
            await pool.close()
    run(go())


def test_issuing_workers_from_the_environment():
    assert Env.from_environ({}).issuing_workers == ISSUING_WORKERS == Issuer.workers
    assert Env.from_environ({"BILLING_BOT_ISSUING_WORKERS": "12"}).issuing_workers == 12
    for bad in ("0", "-1", "many", "2.5", "65"):
        with pytest.raises(ConfigError, match="BILLING_BOT_ISSUING_WORKERS"):
            Env.from_environ({"BILLING_BOT_ISSUING_WORKERS": bad})
