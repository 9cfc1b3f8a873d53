"""`billing-bot serve` as operations see it: the probes, the log, SIGTERM, and a database that
stops or restarts under the running bot. The real process, signed requests, real PostgreSQL."""
from __future__ import annotations

import json
import re
import signal
import time
from datetime import datetime, timezone

import psycopg
import pytest

from .fakes.slack_server import FakeSlack
from .slack_harness import Bot, wait_for
from .test_slack_e2e import case_row, open_case, seed_cases

TIMESTAMPED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")


@pytest.fixture
def slack():
    fake = FakeSlack().start()
    yield fake
    fake.stop()


def log_lines(bot: Bot) -> list[str]:
    if not bot.log.closed:
        bot.log.flush()
    with open(bot.log.name) as fh:
        return fh.read().splitlines()


def test_probes_and_a_clean_timestamped_info_log(db, db_url, slack, tmp_path):
    seed_cases(db)
    bot = Bot(db_url, slack, tmp_path)
    try:
        assert bot.http.get("/livez").json() == {"ok": True}
        assert bot.http.get("/healthz").json() == {"ok": True}
        ready = bot.http.get("/readyz")
        assert ready.status_code == 200 and ready.json() == {"ok": True, "database": "ok"}
        open_case(bot, slack, "i-7f3a 2026-10")
    finally:
        bot.stop()
    assert bot.proc.returncode == 0
    lines = log_lines(bot)
    assert lines and all(TIMESTAMPED.match(line) for line in lines), lines
    assert any(" INFO bot.app: billing-bot listening on :" in line for line in lines), lines
    # nothing but INFO: no library or Bolt warning at start, no traceback, no DeprecationWarning
    assert [line for line in lines if " INFO " not in line] == []


def test_json_log_lines_with_log_format_json(db, db_url, slack, tmp_path):
    bot = Bot(db_url, slack, tmp_path, extra_env={"LOG_FORMAT": "json"})
    bot.stop()
    records = [json.loads(line) for line in log_lines(bot)]
    assert records and {"ts", "level", "logger", "msg"} <= set(records[0])
    assert any(r["msg"].startswith("billing-bot listening on :") and r["level"] == "INFO" for r in records)
    assert any(r["msg"].startswith("shutdown: done") for r in records)


# --- SIGTERM ----------------------------------------------------------------------------------------

def _issuing_setup(db, polar):
    seed_cases(db)
    polar.add_customer("c-acme", email="ada@example.com", name="Ada Lovelace")
    polar.add_order("c-acme", datetime(2026, 11, 1, 0, 5, tzinfo=timezone.utc), 5000)


def _sigterm(bot: Bot) -> tuple[int, float]:
    t0 = time.monotonic()
    bot.proc.send_signal(signal.SIGTERM)
    rc = bot.proc.wait(25)
    return rc, time.monotonic() - t0


def test_sigterm_during_issuing_lets_it_finish_and_exits_0(db, db_url, slack, polar, tmp_path):
    from .test_slack_e2e import issuing_bot
    _issuing_setup(db, polar)
    bot = issuing_bot(db_url, slack, polar, type("NoSmtp", (), {"url": ""})(), tmp_path)
    try:
        case_id, _ = open_case(bot, slack, "i-7f3a 2026-10 T-9")
        polar.server.latency_s = 0.7  # every Polar call now takes a while: issuing is in flight
        bot.action("case_approve", case_id, "U_AGENT2")
        wait_for(lambda: case_row(db_url, case_id)[0] == "issuing", what="issuing")
        rc, took = _sigterm(bot)
    finally:
        bot.stop()
    assert rc == 0 and took < 20, (rc, took)
    assert case_row(db_url, case_id)[0] == "issued" and len(polar.refunds) == 1
    lines = log_lines(bot)
    assert any("shutdown: waiting up to" in line for line in lines)
    assert any("shutdown: done in" in line for line in lines)
    assert not [line for line in lines if " ERROR " in line or "Traceback" in line], lines


def test_sigterm_past_the_drain_bound_cancels_and_the_sweeper_issues_it_once(db, db_url, slack, polar, tmp_path):
    from .fakes.polar_server import TOKEN
    _issuing_setup(db, polar)
    env = {"POLAR_API_URL": polar.url, "POLAR_API_KEY": TOKEN, "BILLING_BOT_DRAIN_S": "0.3"}
    bot = Bot(db_url, slack, tmp_path, extra_env=env)
    try:
        case_id, _ = open_case(bot, slack, "i-7f3a 2026-10 T-10")
        polar.server.latency_s = 3.0
        bot.action("case_approve", case_id, "U_AGENT2")
        wait_for(lambda: case_row(db_url, case_id)[0] == "issuing", what="issuing")
        rc, took = _sigterm(bot)
    finally:
        bot.stop()
    assert rc == 0 and took < 10, (rc, took)
    assert case_row(db_url, case_id)[0] == "issuing"  # handed back, not lost: the outbox says where it was
    assert any("cancelling 1 unfinished background task" in line for line in log_lines(bot))
    polar.server.latency_s = 0.0
    # the sweeper (here at once; in production every 30 s, for cases untouched for 60 s) resumes it
    again = Bot(db_url, slack, tmp_path, extra_env={**env, "BILLING_BOT_SWEEP_S": "0.3", "BILLING_BOT_SWEEP_AGE_S": "0"})
    try:
        wait_for(lambda: case_row(db_url, case_id)[0] == "issued", timeout=20, what="resumed issuing")
    finally:
        again.stop()
    assert len(polar.refunds) == 1 and polar.refunds[0]["amount"] == 1028


def test_sigterm_stops_the_embedded_database_of_serve_demo(slack, tmp_path):
    """`serve --demo` on the embedded PostgreSQL: SIGTERM leaves no PostgreSQL running behind it."""
    data = tmp_path / "pgdata"
    bot = Bot(None, slack, tmp_path, extra_env={"BILLING_BOT_DATA": str(data)}, args=["serve", "--demo"])
    try:
        pid = int((data / "postmaster.pid").read_text().split()[0])
        assert bot.http.get("/readyz").json() == {"ok": True, "database": "ok", "demo_database": True}
        # every message says it comes from the demo database (the demo month: the default periods)
        case_id, upd = open_case(bot, slack, "i-7f3a")
        assert case_id is not None and "Approve $10.28" in json.dumps(upd["blocks"])
        assert upd["blocks"][0]["elements"][0]["text"].startswith(":warning: *DEMO DATABASE: made-up data")
        assert upd["text"].startswith("DEMO DATABASE: made-up data")
        assert all(m["text"].startswith("DEMO DATABASE: ") for m in slack.of("chat.postMessage"))
        rc, took = _sigterm(bot)
    finally:
        bot.stop()
    assert rc == 0 and took < 20
    assert not (data / "postmaster.pid").exists()
    assert not _alive(pid)
    assert "DEMO DATABASE" in log_lines(bot)[0]


def _alive(pid: int) -> bool:
    """Running, not a zombie (an exited postmaster may wait to be reaped by a container's init)."""
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- the database stops, restarts, fails over under the running bot ---------------------------------

class OwnPostgres:
    """A PostgreSQL of this test's own (the session's is shared), which it can stop and start."""

    def __init__(self, folder):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver
        from services.embedded import controlplane_ddl

        self.server = pgserver.get_server(str(folder), cleanup_mode="delete")
        self.url = self.server.get_uri()
        self.socket_dir = self.server.get_postmaster_info().socket_dir
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(controlplane_ddl())

    def _ctl(self, *args: str) -> None:
        from pgserver._commands import pg_ctl
        pg_ctl(["-w", *args], pgdata=self.server.pgdata, user=self.server.system_user, timeout=30)

    def stop(self) -> None:
        self._ctl("stop", "-m", "fast")

    def start(self) -> None:  # the options pgserver starts it with: no TCP, the same socket folder
        self._ctl("-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", str(self.server.log), "start")

    def restart(self) -> None:
        self._ctl("restart", "-m", "fast")

    def close(self) -> None:
        self.server.cleanup()


@pytest.fixture
def own_pg(tmp_path):
    pg = OwnPostgres(tmp_path / "own-pg")
    yield pg
    pg.close()


def test_a_restarted_database_costs_the_pool_no_request(own_pg):
    import asyncio

    from services.db import Database

    async def run():
        db = await Database.connect(own_pg.url, min_size=2, max_size=2)
        try:
            async with db.snapshot() as conn:
                assert (await (await conn.execute("SELECT 1 AS one")).fetchone())["one"] == 1
            own_pg.restart()  # every pooled connection is now dead
            for _ in range(3):  # each of them is replaced as it is taken: no request fails
                async with db.snapshot() as conn:
                    assert (await (await conn.execute("SELECT 2 AS two")).fetchone())["two"] == 2
        finally:
            await db.close()
    asyncio.run(run())


def test_a_stopped_database_fails_a_request_in_bounded_time_and_the_next_one_after_it_is_back_works(own_pg):
    import asyncio

    import psycopg_pool

    from services.db import POOL_WAIT_S, RECONNECT_TIMEOUT_S, Database

    async def run():
        db = await Database.connect(own_pg.url, min_size=1, max_size=2)
        try:
            assert db.pool.timeout == POOL_WAIT_S == 10  # not psycopg_pool's 30 s
            assert db.pool.reconnect_timeout == RECONNECT_TIMEOUT_S == 30  # not 300 s
            own_pg.stop()
            t0 = time.monotonic()
            with pytest.raises(psycopg_pool.PoolTimeout):
                async with db.pool.connection(timeout=1) as conn:
                    await conn.execute("SELECT 1")
            assert time.monotonic() - t0 < 3
            own_pg.start()
            t0 = time.monotonic()
            async with db.snapshot() as conn:  # the pool's own wait: no error, once the pool reconnects
                assert (await (await conn.execute("SELECT 3 AS three")).fetchone())["three"] == 3
            assert time.monotonic() - t0 < POOL_WAIT_S
        finally:
            await db.close()
    asyncio.run(run())


def test_probes_with_the_database_stopped_and_the_first_command_after_it_is_back(own_pg, slack, tmp_path):
    with psycopg.connect(own_pg.url, autocommit=True) as conn:
        seed_cases(conn)
    bot = Bot(own_pg.url, slack, tmp_path)
    try:
        assert bot.http.get("/readyz").status_code == 200  # the pool holds connections that are about to die
        own_pg.stop()
        assert bot.http.get("/livez").status_code == 200  # alive: Kubernetes must not restart it
        ready = bot.http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["database"].startswith("unavailable: ")
        own_pg.start()
        # ready again within the pool's reconnect backoff (1 s, then 2 s... while it was down)
        wait_for(lambda: bot.http.get("/readyz").status_code == 200, timeout=10, what="ready again")
        case_id, upd = open_case(bot, slack, "i-7f3a 2026-10")  # the first command after the restart works
        assert case_id is not None and "Approve $10.28" in json.dumps(upd["blocks"])
        own_pg.restart()  # a failover with no pause at all
        case_id, upd = open_case(bot, slack, "i-stuck 2026-10")  # another instance: i-7f3a's case is open
        assert case_id is not None and "Approve $99.84" in json.dumps(upd["blocks"])
    finally:
        bot.stop()
    assert bot.proc.returncode == 0
