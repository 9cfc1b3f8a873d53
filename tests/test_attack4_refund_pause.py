"""Attack 4: the refund POST and the client-wide 429 pause (services/polar.py `_paused_until`).

The in-flight window (Issuer._posting_elsewhere: 2x the client's timeout after the intent's last
attempt) assumes a refund POST ends within the client's timeout of `Outbox.attempt`. The pause a
429 to any other call of the client sets is waited out inside `_send_once`, i.e. AFTER the attempt
was recorded and BEFORE the POST leaves: the POST can leave up to MAX_RETRY_AFTER_S (30 s) later,
well outside the window. A worker whose database connection died (its session lock with it, the
case this window exists for) then still sends its POST after another replica has decided "no
refund of that attempt, not made" and posted its own: two refunds for one case.
"""
import asyncio
import time

import psycopg

from services import store as store_mod
from services.polar import PolarClient
from services.store import Outbox

from .fakes.polar_server import TOKEN
from .test_issuing import World, orders, seed


def run(coro):
    return asyncio.run(coro)


def test_a_post_held_by_the_rate_limit_pause_is_not_sent_after_another_worker_reposted(db, db_url, polar, monkeypatch):
    seed(db)
    orders(polar)
    pause_s = 2.5
    real_attempt = Outbox.attempt
    killed = {}

    async def attempt_then_lose_the_lock(self, issuance_id):
        await real_attempt(self, issuance_id)
        if killed:
            return
        # worker A: right after its attempt is recorded, another call of its client got a 429
        # (Retry-After 2.5 s), and its pooled connection dies (the session lock goes with it)
        killed["a"] = True
        a_client._paused_until = time.monotonic() + pause_s
        pid = store_mod._bound.get().info.backend_pid
        with psycopg.connect(db_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

    monkeypatch.setattr(Outbox, "attempt", attempt_then_lose_the_lock)

    async def go():
        nonlocal a_client
        async with World(db_url, polar) as a, World(db_url, polar) as b:
            # both replicas' clients have a short timeout: the in-flight window is 2 x 0.25 s
            for w in (a, b):
                await w.client.close()
                w.client = PolarClient(polar.url, TOKEN, backoff=0.05, timeout=0.25)
                w.issuer.polar = w.client
            a_client = a.client
            case = await a.approved_case(periods=("2026-10",))

            async def worker_a():
                try:
                    await a.issuer.issue(case.id)
                except Exception:
                    pass  # its connection is gone: whatever it still does in the database fails

            task = asyncio.create_task(worker_a())
            while not killed:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.6)  # past the in-flight window of A's attempt, A's POST not sent yet
            await b.issuer.issue(case.id)  # replica B (its sweeper) takes the case
            await task
            await asyncio.sleep(0.2)

    a_client = None
    run(go())
    made = [r for r in polar.refunds if r["status"] != "failed"]
    assert len(made) <= 1, f"two refunds for one case: {[(r['id'], r['amount']) for r in made]}"
