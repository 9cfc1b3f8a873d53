"""PostgreSQL access: a psycopg 3 async pool, parameterized queries, read-only snapshots for reads.

Every connection runs in UTC with a statement timeout. The control-plane tables are read in one
REPEATABLE READ, READ ONLY transaction so a case sees one consistent snapshot. The bot writes
only billing_corrections in the control-plane schema; its own state lives in its own schema.
"""
from __future__ import annotations

import re
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import AsyncIterator
from urllib.parse import urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from handlers.model import Instance, OrgInterval, Record
from handlers.timeline import to_us
from services.config import ISSUING_WORKERS, ConfigError, Throttle

STATEMENT_TIMEOUT_MS = 15_000
_RECORD_COLUMNS = ("id, instance_id, org_id, customer_id, tier, rate_per_hour, hours_used, total_charge, billing_period,"
                   " (extract(epoch FROM start_time) * 1000000)::bigint, (extract(epoch FROM end_time) * 1000000)::bigint")
RECORDS_FOR_PERIODS_SQL = (Path(__file__).parent / "sql" / "records_for_periods.sql").read_text().replace(
    "{columns}", _RECORD_COLUMNS)
# the same for a list of instances: each one's records, in instance then id order
_RECORDS_OF_SQL = (f"SELECT x.* FROM unnest(%(instances)s::text[]) AS q(instance) CROSS JOIN LATERAL"
                   f" ({RECORDS_FOR_PERIODS_SQL.replace('%(instance)s', 'q.instance')}) x")
ORG_DAY_FIRST_BOUND = timedelta(hours=3)
ORG_DAYS_SQL = (Path(__file__).parent / "sql" / "org_days.sql").read_text()
# A timestamptz as integer microseconds since the epoch, computed by the server: exact, and far
# cheaper than building a datetime per row in Python.
_US = "(extract(epoch FROM {0}) * 1000000)::bigint"


async def _configure(conn: psycopg.AsyncConnection) -> None:
    await conn.execute("SET TIME ZONE 'UTC'")
    await conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
    await conn.commit()


# libpq waits forever for an unreachable host by default; 5 s lets a command say what failed in time.
CONNECT_TIMEOUT_S = 5
# How long start-up waits for the pool's first connection, after the probe connection has succeeded.
POOL_OPEN_TIMEOUT_S = 10
# How long a request waits for a pooled connection (psycopg_pool's default is 30 s): while the
# database is down, the agent hears "could not investigate" after this, not after half a minute.
POOL_WAIT_S = 10
# How long the pool keeps retrying a lost connection on its own, with backoff doubling from 1 s.
# psycopg_pool's 300 s lets the gap between attempts grow past a minute during a long outage, and
# requests would keep timing out well after the database is back. After this the pool stops, and
# the next request (or /readyz, every few seconds) starts a fresh attempt at once.
RECONNECT_TIMEOUT_S = 30


class DatabaseUrlError(ConfigError):
    """DATABASE_URL is not a PostgreSQL URL. The message shows the URL with its password redacted."""


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***: in user:password@, in ?password=, in key=value form."""
    # greedy up to the last @ of the authority: a password may itself hold an unescaped @
    out = re.sub(r"(//[^/@:?#]*:)[^/?#]*@", r"\1***@", url)            # scheme://user:pw@host
    out = re.sub(r"^([^:/@?#=\s]+):[^/?#\s]*@", r"\1:***@", out)       # user:pw@host (no scheme)
    return re.sub(r"(password\s*=\s*)('[^']*'|[^&\s]*)", r"\1***", out, flags=re.IGNORECASE)


def validate_database_url(url: str) -> str:
    """A postgresql:// (or postgres://) URL, else DatabaseUrlError naming what is wrong, redacted.

    A bare 'user:pw@host/db' would otherwise reach libpq as a key=value string, whose parse error
    quotes the whole string, password included."""
    shown = redact_url(url)
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        why = "no scheme" if not parts.scheme or "://" not in url else f"scheme {parts.scheme!r}"
        raise DatabaseUrlError(f"DATABASE_URL: expected postgresql://user:password@host:5432/dbname, got "
                               f"{shown!r} ({why})")
    try:
        conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        raise DatabaseUrlError(f"DATABASE_URL: not a valid PostgreSQL URL: {shown!r}") from None
    return url


def _connect_kwargs(url: str) -> dict:
    """connect_timeout unless the URL sets its own."""
    try:
        given = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        given = {}
    return {} if "connect_timeout" in given else {"connect_timeout": CONNECT_TIMEOUT_S}


def make_pool(url: str, *, min_size: int = 1, max_size: int = 8, name: str | None = None) -> AsyncConnectionPool:
    # check: each connection is tested (an empty query) as it is taken from the pool, so after a
    # database restart or failover the dead connections are replaced instead of failing a request.
    return AsyncConnectionPool(url, min_size=min_size, max_size=max_size, open=False, timeout=POOL_WAIT_S,
                               reconnect_timeout=RECONNECT_TIMEOUT_S, name=name,
                               configure=_configure, check=AsyncConnectionPool.check_connection,
                               kwargs={"row_factory": dict_row, **_connect_kwargs(url)})


def worker_pool_size(workers: int) -> int:
    """The issuing workers' pool: one connection per worker, and one for the sweeper."""
    return workers + 1


class Database:
    def __init__(self, pool: AsyncConnectionPool, bot_schema: str = "billing_bot",
                 worker_pool: AsyncConnectionPool | None = None):
        self.pool = pool
        self.schema = bot_schema
        # The issuing workers' own connections (Store.bound and nothing else), so the workers never
        # take the ones checks and Slack's listeners use; None: they share `pool` (tests).
        self.worker_pool = worker_pool
        self._worker_pool_wanted = 0  # the largest size an issuer asked for (fit_worker_pool)

    @classmethod
    async def connect(cls, url: str, bot_schema: str = "billing_bot", *, issuing_workers: int = ISSUING_WORKERS,
                      **kw) -> "Database":
        """Open the pool, and the issuing workers' pool (`worker_pool_size(issuing_workers)`; none
        open until a worker asks, so commands that never issue add no connection). One direct
        connection first: when the database cannot be reached, it raises libpq's own reason (refused,
        timed out, authentication) within CONNECT_TIMEOUT_S, where the pool would retry quietly and
        end in a bare PoolTimeout."""
        probe = await psycopg.AsyncConnection.connect(url, **_connect_kwargs(url))
        await probe.close()
        pool = make_pool(url, **kw)
        await pool.open(wait=True, timeout=POOL_OPEN_TIMEOUT_S)
        workers = make_pool(url, min_size=0, max_size=worker_pool_size(issuing_workers), name="issuing")
        try:
            await workers.open(wait=True, timeout=POOL_OPEN_TIMEOUT_S)
        except BaseException:
            await pool.close()
            raise
        return cls(pool, bot_schema, worker_pool=workers)

    async def fit_worker_pool(self, workers: int) -> None:
        """Room in the workers' pool for `workers` issuings at once and the sweeper (an Issuer with
        more workers than the pool was opened for grows it; never shrunk)."""
        pool = self.worker_pool
        if pool is None:
            return
        # resize waits for the pool's lock, so concurrent fits may land in any order: each asks for
        # the largest size wanted so far and looks again after, so a smaller one never lands last
        self._worker_pool_wanted = max(self._worker_pool_wanted, worker_pool_size(workers))
        while pool.max_size < self._worker_pool_wanted:
            await pool.resize(pool.min_size, self._worker_pool_wanted)

    async def close(self) -> None:
        try:
            if self.worker_pool is not None:
                await self.worker_pool.close()
        finally:
            await self.pool.close()

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[psycopg.AsyncConnection]:
        """A read-only, repeatable-read transaction."""
        async with self.pool.connection() as conn:
            async with conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                yield conn

    # --- control-plane reads -------------------------------------------------------------------

    @staticmethod
    async def instance(conn, instance_id: str) -> Instance | None:
        """The instance's row, or None (`instances` reads many, and those known only by records)."""
        cur = await conn.execute(f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE instance_id = %s", (instance_id,))
        row = await cur.fetchone()
        return None if row is None else _instance(row)

    @staticmethod
    async def records(conn, instance_id: str, periods: list[str] | None = None,
                      run_gap: timedelta = timedelta(seconds=60)) -> list[Record]:
        """The instance's records, in id order: its whole history, or with periods, only the history
        that can change those periods' findings (RECORDS_FOR_PERIODS_SQL says which)."""
        if periods is not None:
            return (await Database.records_of(conn, [instance_id], periods, run_gap))[instance_id]
        cur = conn.cursor(row_factory=psycopg.rows.tuple_row)
        await cur.execute(f"SELECT {_RECORD_COLUMNS} FROM billing_records WHERE instance_id = %s ORDER BY id",
                          (instance_id,))
        return [Record(*r) for r in await cur.fetchall()]

    # --- the same reads for a chunk of instances (a check over many: services/multi_check.py) ---

    @staticmethod
    async def instances(conn, instance_ids: list[str]) -> dict[str, Instance]:
        """instance -> its row, for the instances that have one; else, for those with billing
        records only, what their latest record says (an instance known only from its records)."""
        cur = await conn.execute(f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE instance_id = ANY(%s)",
                                 (instance_ids,))
        out = {row["instance_id"]: _instance(row) for row in await cur.fetchall()}
        missing = [i for i in instance_ids if i not in out]
        if missing:
            cur = await conn.execute(
                "SELECT DISTINCT ON (instance_id) instance_id, org_id, customer_id, tier FROM billing_records"
                " WHERE instance_id = ANY(%s) ORDER BY instance_id, id DESC", (missing,))
            for row in await cur.fetchall():
                out[row["instance_id"]] = Instance(row["instance_id"], row["org_id"], row["customer_id"], row["tier"],
                                                   "unknown", None, None, None, None)
        return out

    @staticmethod
    async def records_of(conn, instance_ids: list[str], periods: list[str],
                         run_gap: timedelta = timedelta(seconds=60)) -> dict[str, list[Record]]:
        """instance -> `records(conn, instance, periods)`, for many instances in one statement
        (RECORDS_FOR_PERIODS_SQL for each, side by side)."""
        out: dict[str, list[Record]] = {i: [] for i in instance_ids}
        cur = conn.cursor(row_factory=psycopg.rows.tuple_row)
        await cur.execute("SET LOCAL work_mem = '32MB'")
        await cur.execute(_RECORDS_OF_SQL, {"instances": instance_ids, "periods": periods, "gap": run_gap},
                          prepare=False)
        for r in await cur.fetchall():
            out[r[1]].append(Record(*r))
        return out

    @staticmethod
    async def throttles(conn, org_ids: list[str], defaults: Throttle) -> dict[str, tuple[Throttle, bool]]:
        """org -> `throttle(conn, org, defaults)`, for many orgs in one statement."""
        cur = await conn.execute(
            "SELECT org_id, continuous_limit, daily_limit, idle_timeout FROM throttle_settings WHERE org_id = ANY(%s)",
            (org_ids,))
        rows = {r["org_id"]: (Throttle(r["continuous_limit"], r["daily_limit"], r["idle_timeout"]), True)
                for r in await cur.fetchall()}
        return {o: rows.get(o, (defaults, False)) for o in org_ids}

    @staticmethod
    async def throttle(conn, org_id: str, defaults: Throttle) -> tuple[Throttle, bool]:
        """The org's limits and whether they came from a throttle_settings row."""
        return (await Database.throttles(conn, [org_id], defaults))[org_id]

    @staticmethod
    async def org_intervals(conn, org_id: str, days: list[datetime], limit: timedelta) -> list[OrgInterval]:
        """The org's billed time on the given UTC days as each instance's de-duplicated spans (SPEC 2.2
        step 4 applies step 1 per instance), up to the moment each day passes the limit: exactly what
        the daily-limit rule needs to find that moment, and nothing after it (`org_intervals_of`)."""
        return (await Database.org_intervals_of(conn, {org_id: (days, limit)})).get(org_id, [])

    @staticmethod
    async def org_intervals_of(conn, wanted: dict[str, tuple[list[datetime], timedelta]]
                               ) -> dict[str, list[OrgInterval]]:
        """org -> its intervals (`org_intervals`) on its days under its daily limit, for many orgs.

        One set-based statement (sql/org_days.sql) for all the orgs' days, reading each day's records
        only up to a bound: first the day's first ORG_DAY_FIRST_BOUND, then twice as far for the days
        that did not pass the limit before it. A busy org passes it early and is read for a few hours;
        a quiet one has few rows to read again. Days that never reach the limit come back empty.
        """
        out: dict[str, list[OrgInterval]] = {org: [] for org in wanted}
        whole = timedelta(days=1)
        pending = {(org, d): min(ORG_DAY_FIRST_BOUND, whole) for org, (days, _) in wanted.items() for d in set(days)}
        if not pending:
            return out
        cur = conn.cursor(row_factory=psycopg.rows.tuple_row)
        await cur.execute("SET LOCAL work_mem = '32MB'")  # a busy org's days sort in memory
        while pending:
            keys = sorted(pending)
            await cur.execute(ORG_DAYS_SQL, {"orgs": [o for o, _ in keys], "days": [d for _, d in keys],
                                             "bounds": [d + pending[(o, d)] for o, d in keys],
                                             "limits": [wanted[o][1] for o, _ in keys]}, prepare=False)
            passed = set()
            for org, lo, instance_id, s, e in await cur.fetchall():
                passed.add((org, lo))
                out[org].append(OrgInterval(instance_id, 0, s, e))
            pending = {(o, d): min(b * 2, whole) for (o, d), b in pending.items()
                       if b < whole and (o, to_us(d)) not in passed}
        return out

    # --- the bot's own schema (read side used by checks) ------------------------------------------

    async def systematic_counts(self, conn, periods: list[str]) -> dict[str, int]:
        """The latest reconciled day's counts per finding kind (services.store.systematic_counts)."""
        from services.store import systematic_counts

        return await systematic_counts(conn, self.schema, periods)


_INSTANCE_COLUMNS = ("instance_id, org_id, customer_id, tier, status, created_at, started_at, stopped_at,"
                     " last_heartbeat")


def _instance(row) -> Instance:
    return Instance(instance_id=row["instance_id"], org_id=row["org_id"], customer_id=row["customer_id"],
                    tier=row["tier"], status=row["status"], created_at=_us(row["created_at"]),
                    started_at=_us(row["started_at"]), stopped_at=_us(row["stopped_at"]),
                    last_heartbeat=_us(row["last_heartbeat"]))


def _us(value) -> int | None:
    return None if value is None else to_us(value)
