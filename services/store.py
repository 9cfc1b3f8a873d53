"""The bot's own state in PostgreSQL (its own schema): the only module with SQL on the bot's tables.

- `Store`: migrations (at start, under an advisory lock, so replicas starting at once apply each
  file once) and the reconciliation counts.
- `CaseStore`: cases, the pieces of billed time they hold, the audit trail. Every change of a case
  is one conditional UPDATE (`... WHERE state = ANY(<the action's sources>)`) with its audit event
  in the same transaction, so double clicks, Slack retries and two replicas give one change; the
  database's trigger refuses any move that handlers.cases.TRANSITIONS does not list.
- `CaseStore.locked(customer, instance)`: a transaction holding the per-customer and per-instance
  locks (SPEC 2.2): claiming pieces, approving, and the last look before money moves go through it.
- `Outbox`: the money movements, recorded before any call to Polar.

A worker can bind one connection to its task (`bound`, from the issuing workers' own pool), so all of
its writes and its session lock use that connection: issuing never holds one connection while
waiting for a second.
"""
from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import weakref
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import AsyncIterator, Iterable

from handlers.cases import HOLDING, OPEN, TRANSITIONS, Action, Case, allowed_moves
from handlers.model import PriorCase, PriorCover
from handlers.timeline import to_us
from services.db import Database

MIGRATIONS = Path(__file__).parent / "sql" / "migrations"
LOCK_KEY = 7_242_001  # pg_advisory_xact_lock key for migrations
CUSTOMER_LOCKS = 7_242_003  # pg_advisory_xact_lock(space, hashtext(customer_id))
INSTANCE_LOCKS = 7_242_004  # pg_advisory_xact_lock(space, hashtext(instance_id))
CASE_LOCKS = 7_242_002  # pg_try_advisory_lock(space, case id): one issuing worker per case

_RECORDS_FOR_PERIODS = (Path(__file__).parent / "sql" / "records_for_periods.sql").read_text()
_bound: contextvars.ContextVar = contextvars.ContextVar("billing_bot_bound_connection", default=None)
# Without the workers' pool, at most all but one of the pool's connections are bound at once (per
# pool): a bound worker that needs a second connection (a re-check's snapshot) then always gets one,
# where with every connection bound each would wait on the others until the pool's wait ran out.
_SHARED_BINDS: "weakref.WeakKeyDictionary[object, asyncio.Semaphore]" = weakref.WeakKeyDictionary()

# Columns a move may set besides the state (the rest are the store's own business).
MOVE_FIELDS = {"decided_by", "reason", "method", "credit_cents", "required_level", "issued_cents", "remainder_cents",
               "polar_reference", "exposure_cents", "failures"}


class Store:
    def __init__(self, db: Database):
        self.db = db
        self.s = db.schema  # validated identifier (services.config)

    @asynccontextmanager
    async def _conn(self):
        """The connection bound to this task, else one from the pool."""
        conn = _bound.get()
        if conn is not None:
            yield conn
            return
        async with self.db.pool.connection() as conn:
            yield conn

    @asynccontextmanager
    async def bound(self) -> AsyncIterator[object]:
        """Bind one connection to the current task for the duration (autocommit): from the issuing
        workers' own pool (`Database.worker_pool`), so a worker waiting on Polar never holds one of
        the connections checks and Slack's listeners use; from the pool when there is none (then
        leaving one of its connections unbound: _SHARED_BINDS)."""
        pool = getattr(self.db, "worker_pool", None)
        room = nullcontext()
        if pool is None:
            pool = self.db.pool
            room = _SHARED_BINDS.setdefault(pool, asyncio.Semaphore(max(pool.max_size - 1, 1)))
        async with room, pool.connection() as conn:
            await conn.set_autocommit(True)
            token = _bound.set(conn)
            try:
                yield conn
            finally:
                _bound.reset(token)
                try:  # a session lock must never go back to the pool with the connection
                    await conn.execute("SELECT pg_advisory_unlock_all()")
                    await conn.set_autocommit(False)
                except BaseException:
                    await conn.close()  # the server releases its locks; the pool drops it

    async def migrate(self) -> list[str]:
        applied = []
        async with self._conn() as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.s}")
                await conn.execute(f"CREATE TABLE IF NOT EXISTS {self.s}.schema_migrations"
                                   " (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
                cur = await conn.execute(f"SELECT name FROM {self.s}.schema_migrations")
                done = {r["name"] for r in await cur.fetchall()}
                for path in sorted(MIGRATIONS.glob("*.sql")):
                    if path.name in done:
                        continue
                    await conn.execute(path.read_text().replace("{schema}", self.s))
                    await conn.execute(f"INSERT INTO {self.s}.schema_migrations (name) VALUES (%s)", (path.name,))
                    applied.append(path.name)
                # the trigger's table is always this code's table of transitions
                await conn.execute(f"DELETE FROM {self.s}.case_transitions")
                async with conn.cursor() as cur:
                    await cur.executemany(f"INSERT INTO {self.s}.case_transitions VALUES (%s, %s)",
                                          sorted(allowed_moves()))
        return applied

    async def record_reconciliation(self, rec, *, run_key: str | None = None, shards: int = 1) -> int | None:
        """Store a whole day's run, its totals and, per finding kind, how many customers it touched
        (SPEC 2.4). With a run_key (the merge of a sharded run) at most one process stores it: the
        unique index decides, and the others get None."""
        await self.migrate()
        period = rec.day.strftime("%Y-%m")
        async with self._conn() as conn:
            async with conn.transaction():
                cur = await conn.execute(
                    f"INSERT INTO {self.s}.reconcile_runs (day, totals, run_key, shards) VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT (run_key) WHERE shard IS NULL AND run_key IS NOT NULL DO NOTHING RETURNING id",
                    (rec.day, json.dumps(rec.totals()), run_key, shards))
                row = await cur.fetchone()
                if row is None:
                    return None
                run_id = row["id"]
                for kind, customers in rec.customers_by_finding_kind().items():
                    await conn.execute(
                        f"INSERT INTO {self.s}.reconcile_kind_customers VALUES (%s, %s, %s, %s)",
                        (run_id, period, kind, len(customers)))
                await self._record_customer_kinds(conn, run_id, rec)
        return run_id

    async def _record_customer_kinds(self, conn, run_id: int, rec) -> None:
        """The run's anomalies per (customer, kind): counts and overcharge cents (migration 035), in
        the run's own transaction, and the run marked as having them."""
        counts = sorted(rec.customer_kind_counts().items())
        if counts:
            await conn.execute(
                f"INSERT INTO {self.s}.reconcile_customer_kinds (run_id, customer_id, kind, anomalies, overcharge_cents)"
                " SELECT %s, * FROM unnest(%s::text[], %s::text[], %s::integer[], %s::bigint[])",
                (run_id, [c for (c, _), _ in counts], [k for (_, k), _ in counts], [n for _, (n, _) in counts],
                 [cents for _, (_, cents) in counts]))
        await conn.execute(f"UPDATE {self.s}.reconcile_runs SET customer_kinds_stored = true WHERE id = %s", (run_id,))

    async def customer_anomalies(self, lo, hi, customer_ids: list[str]) -> tuple[dict[str, dict[str, dict]], int]:
        """Per customer and anomaly kind, {anomalies, overcharge_cents} summed over the days lo <= day < hi,
        each day counted from its latest whole-day run (one process, or the merge of all shards; a
        shard's own row never), and how many of those days' latest runs have the counts. Before the
        bot's schema has the table: ({}, 0)."""
        async with self._conn() as conn:
            if not await table_exists(conn, f"{self.s}.reconcile_customer_kinds"):
                return {}, 0
            latest = (f"SELECT DISTINCT ON (day) id, customer_kinds_stored FROM {self.s}.reconcile_runs"
                      " WHERE shard IS NULL AND day >= %(lo)s AND day < %(hi)s ORDER BY day, id DESC")
            cur = await conn.execute(f"SELECT count(*) FILTER (WHERE customer_kinds_stored) AS days FROM ({latest}) r",
                                     {"lo": lo, "hi": hi})
            days = (await cur.fetchone())["days"]
            cur = await conn.execute(
                f"SELECT k.customer_id, k.kind, sum(k.anomalies)::bigint AS n, sum(k.overcharge_cents)::bigint AS cents"
                f" FROM {self.s}.reconcile_customer_kinds k JOIN ({latest}) r ON r.id = k.run_id"
                " WHERE k.customer_id = ANY(%(ids)s) GROUP BY k.customer_id, k.kind",
                {"lo": lo, "hi": hi, "ids": customer_ids})
            out: dict[str, dict[str, dict]] = {}
            for row in await cur.fetchall():
                out.setdefault(row["customer_id"], {})[row["kind"]] = {"anomalies": int(row["n"]),
                                                                     "overcharge_cents": int(row["cents"])}
            return out, int(days)

    async def save_shard_row(self, run_key: str, shard: tuple[int, int], day, totals: dict, anomalies: list) -> None:
        """A shard's part of a day (reconcile --shard); a retried shard replaces its row."""
        async with self._conn() as conn:
            await conn.execute(
                f"INSERT INTO {self.s}.reconcile_runs (day, totals, run_key, shard, shards, anomalies)"
                " VALUES (%s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (run_key, shard) WHERE shard IS NOT NULL"
                " DO UPDATE SET totals = EXCLUDED.totals, anomalies = EXCLUDED.anomalies, ran_at = now()",
                (day, json.dumps(totals), run_key, shard[0], shard[1], json.dumps(anomalies)))

    async def shard_rows(self, run_key: str, shards: int, day) -> list[dict]:
        async with self._conn() as conn:
            cur = await conn.execute(
                f"SELECT shard, anomalies FROM {self.s}.reconcile_runs"
                " WHERE run_key = %s AND shard IS NOT NULL AND shards = %s AND day = %s", (run_key, shards, day))
            return await cur.fetchall()

    async def claim_post(self, run_key: str) -> bool:
        """True for exactly one process: the one whose UPDATE marked the merged run as being posted."""
        async with self._conn() as conn:
            cur = await conn.execute(
                f"UPDATE {self.s}.reconcile_runs SET posted_at = now()"
                " WHERE run_key = %s AND shard IS NULL AND posted_at IS NULL RETURNING id", (run_key,))
            return await cur.fetchone() is not None

    async def release_post(self, run_key: str) -> None:
        async with self._conn() as conn:
            await conn.execute(f"UPDATE {self.s}.reconcile_runs SET posted_at = NULL"
                               " WHERE run_key = %s AND shard IS NULL", (run_key,))


_TABLES_SEEN: set[tuple] = set()  # (server, database, table) known to exist: a table the bot made stays


async def table_exists(conn, name: str) -> bool:
    """Whether the bot's table exists (a check also runs on a database the bot never wrote to).
    Only a yes is remembered: a check of 20,000 instances asks the catalog once, not 60,000 times."""
    info = conn.info
    key = (info.host, info.port, info.dbname, name)
    if key in _TABLES_SEEN:
        return True
    cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL AS ok", (name,))
    if (await cur.fetchone())["ok"]:
        _TABLES_SEEN.add(key)
        return True
    return False


async def evidence_fingerprint(conn, s: str, instance_id: str, org_id: str, periods: Iterable[str]) -> str:
    """A digest of the database evidence a case is built on (SPEC 2.2): the instance row, its
    records, the org's throttle row, and the pieces of the checked periods' records that issued
    cases credited. Computed by the server, so the check and every later look agree."""
    return (await evidence_fingerprints(conn, s, [(instance_id, org_id)], periods))[instance_id]


async def evidence_fingerprints(conn, s: str, instance_orgs: Iterable[tuple[str, str]],
                                periods: Iterable[str]) -> dict[str, str]:
    """instance -> its evidence fingerprint (`evidence_fingerprint`), for many instances in one
    statement: a check over thousands of instances reads them a chunk at a time. One instance's
    fingerprint is this statement's answer for one, so every look computes it the same way."""
    pairs = sorted(set(instance_orgs))
    if not pairs:
        return {}
    has_cases = await table_exists(conn, f"{s}.case_pieces")
    credited = (f"""(SELECT string_agg(concat_ws(':', p.case_id, p.record_id, p.start_us, p.end_us, p.extra_events),
                                     ',' ORDER BY p.case_id, p.record_id, p.start_us, p.extra_events)
                    FROM {s}.case_pieces p JOIN {s}.cases c ON c.id = p.case_id AND c.state = 'issued'
                    JOIN billing_records r ON r.id = p.record_id AND r.billing_period = ANY(%(periods)s)
                                           AND r.instance_id = q.i
                    WHERE q.i = ANY(c.instance_ids))""" if has_cases else "''")
    # Only what can change the checked periods: the records a check of them reads (the periods'
    # records and the history that can change them, services/sql/records_for_periods.sql, the
    # same query the check uses), and the heartbeat only while it falls before their end (after
    # them, the idle window they could meet does not move): a running instance's heartbeats and
    # new months do not block approvals, and a long history is not hashed whole.
    recs = _RECORDS_FOR_PERIODS.replace("%(instance)s", "q.i").replace("{columns}", (
        "r.id, r.end_time, row(r.id, r.org_id, r.customer_id, r.tier, r.rate_per_hour, r.hours_used,"
        " r.total_charge, r.billing_period, r.start_time, r.end_time)::text AS t"))
    cur = await conn.execute(
        f"""SELECT q.i AS instance_id, f.fp
            FROM unnest(%(instances)s::text[], %(orgs)s::text[]) AS q(i, o)
            CROSS JOIN LATERAL (
              WITH recs AS (SELECT * FROM ({recs}) x)
              SELECT md5(concat_ws('|',
                (SELECT row(i.instance_id, i.org_id, i.customer_id, i.tier, i.status, i.created_at, i.started_at,
                            i.stopped_at, CASE WHEN i.last_heartbeat >= (SELECT max(end_time) FROM recs) THEN NULL
                                               ELSE i.last_heartbeat END)::text
                 FROM instances i WHERE i.instance_id = q.i),
                (SELECT string_agg(t, ',' ORDER BY id) FROM recs),
                (SELECT row(t.*)::text FROM throttle_settings t WHERE t.org_id = q.o),
                {credited})) AS fp) f""",
        {"instances": [i for i, _ in pairs], "orgs": [o for _, o in pairs], "periods": sorted(periods),
         "gap": timedelta(seconds=60)}, prepare=False)
    return {r["instance_id"]: r["fp"] for r in await cur.fetchall()}


async def evidence_fingerprint_of(conn, s: str, instance_orgs: Iterable[tuple[str, str]],
                                  periods: Iterable[str]) -> str:
    """The fingerprint of a case's evidence: one instance's own, or for a case over several, a
    digest of each instance's (in instance order, so the check and every later look agree)."""
    pairs = sorted(instance_orgs)
    fps = await evidence_fingerprints(conn, s, pairs, list(periods))
    if len(pairs) == 1:
        return fps[pairs[0][0]]
    return combine_fingerprints(f"{i}={fps[i]}" for i, _ in pairs)


def combine_fingerprints(parts: Iterable[str]) -> str:
    """`instance=fingerprint` parts -> one digest (sorted, so the order they were read in is moot)."""
    return hashlib.md5("|".join(sorted(parts)).encode()).hexdigest()


async def held_pieces(conn, s: str, instance_id: str, exclude_case: int | None = None
                      ) -> tuple[list[PriorCover], list[PriorCase]]:
    """Pieces of this instance's records that other cases hold (SPEC 2.2): open cases from
    opening until rejected or expired, issued ones for good; read in the caller's snapshot.
    exclude_case: the case being checked again, whose own pieces are not held against it."""
    return (await held_pieces_of(conn, s, [instance_id], exclude_case))[instance_id]


async def held_pieces_of(conn, s: str, instance_ids: Iterable[str], exclude_case: int | None = None
                         ) -> dict[str, tuple[list[PriorCover], list[PriorCase]]]:
    """instance -> `held_pieces` of it, for many instances in two statements."""
    ids = sorted(set(instance_ids))
    out: dict[str, tuple[list[PriorCover], list[PriorCase]]] = {i: ([], []) for i in ids}
    if not ids or not await table_exists(conn, f"{s}.case_pieces"):
        return out  # a database the bot never wrote to
    cur = await conn.execute(
        f"SELECT r.instance_id, p.case_id, p.record_id, p.start_us, p.end_us, p.extra_events"
        f" FROM {s}.case_pieces p JOIN {s}.cases c ON c.id = p.case_id"
        f" JOIN billing_records r ON r.id = p.record_id AND r.instance_id = ANY(%(ids)s)"
        f" WHERE c.instance_ids && %(ids)s AND r.instance_id = ANY(c.instance_ids)"
        f" AND c.state = ANY(%(holding)s) AND c.id IS DISTINCT FROM %(exclude)s",
        {"ids": ids, "holding": list(HOLDING), "exclude": exclude_case})
    for r in await cur.fetchall():
        out[r["instance_id"]][0].append(
            PriorCover(r["case_id"], r["record_id"], r["start_us"], r["end_us"], r["extra_events"]))
    cur = await conn.execute(
        f"SELECT c.id, c.state, CASE WHEN c.state = 'issued' THEN c.issued_cents ELSE c.credit_cents END AS cents,"
        f" c.kinds, c.issued_at, c.instance_ids FROM {s}.cases c"
        f" WHERE c.instance_ids && %(ids)s AND c.state = ANY(%(holding)s) AND c.id IS DISTINCT FROM %(exclude)s"
        f" ORDER BY c.id", {"ids": ids, "holding": list(HOLDING), "exclude": exclude_case})
    for r in await cur.fetchall():
        case = PriorCase(r["id"], r["cents"] or 0, tuple(r["kinds"] or ()),
                         None if r["issued_at"] is None else to_us(r["issued_at"]), r["state"])
        for i in r["instance_ids"]:
            if i in out:
                out[i][1].append(case)
    return out


async def systematic_counts(conn, s: str, periods: list[str]) -> dict[str, int]:
    """Finding kind -> customers the reconciliation of the latest reconciled day saw it for, if
    that day is in the checked periods (SPEC 2.4, 5.2). The latest day, not the latest run:
    reconciling an old day again must not replace the counts. Only whole-day runs count (one
    process, or the merge of all shards); of several runs of that day, the last."""
    if not await table_exists(conn, f"{s}.reconcile_kind_customers"):
        return {}
    cur = await conn.execute(
        "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = 'shard' AND NOT attisdropped",
        (f"{s}.reconcile_runs",))
    whole = "WHERE shard IS NULL" if await cur.fetchone() else ""  # before migration 010 every run was whole
    cur = await conn.execute(
        f"SELECT finding_kind, customers FROM {s}.reconcile_kind_customers"
        f" WHERE run_id = (SELECT id FROM {s}.reconcile_runs {whole} ORDER BY day DESC, id DESC LIMIT 1)"
        " AND period = ANY(%s)", (periods,))
    return {r["finding_kind"]: int(r["customers"]) for r in await cur.fetchall()}


def _case(row) -> Case | None:
    return None if row is None else Case.from_row(row)


def _ids(instances: str | Iterable[str]) -> list[str]:
    return [instances] if isinstance(instances, str) else sorted(set(instances))


@dataclass
class Draft:
    """What a check proposes, before it becomes a case."""

    report: dict  # SPEC 5 JSON of the check
    covered: list[dict]  # the pieces it credits: {kind, record_id, start, end, extra_events}
    fingerprint: str
    requested_by: str
    ticket_id: str | None
    channel_id: str | None
    response_url: str | None
    method: str
    approvers: dict
    batch_id: int | None = None


def _report_instances(report: dict) -> list[str]:
    """The instances a check's JSON covers: its instance, or each of its `instances`."""
    if report.get("instance_id"):
        return [report["instance_id"]]
    return sorted(i["instance_id"] for i in report.get("instances") or ())


class CaseTx:
    """One transaction under the customer's and the instance's locks (see CaseStore.locked)."""

    def __init__(self, store: "CaseStore", conn):
        self.store, self.conn, self.s = store, conn, store.s

    async def get(self, case_id: int) -> Case | None:
        cur = await self.conn.execute(f"SELECT * FROM {self.s}.cases WHERE id = %s FOR UPDATE", (case_id,))
        return _case(await cur.fetchone())

    async def open_case_over(self, instances: str | Iterable[str], periods: Iterable[str]) -> Case | None:
        """The open case a second check shows instead of opening another: one holding time of all
        of these instances in periods that meet these (for one instance: any open case of it)."""
        cur = await self.conn.execute(
            f"SELECT * FROM {self.s}.cases WHERE instance_ids @> %s AND state = ANY(%s) AND periods && %s"
            " ORDER BY id LIMIT 1", (_ids(instances), list(OPEN), list(periods)))
        return _case(await cur.fetchone())

    async def batch_case(self, batch_id: int, customer_id: str) -> Case | None:
        cur = await self.conn.execute(
            f"SELECT * FROM {self.s}.cases WHERE batch_id = %s AND customer_id = %s AND parent_case_id IS NULL",
            (batch_id, customer_id))
        return _case(await cur.fetchone())

    async def case_fingerprint(self, instance_orgs: Iterable[tuple[str, str]], periods: Iterable[str]) -> str:
        return await evidence_fingerprint_of(self.conn, self.s, instance_orgs, periods)

    async def exposure(self, customer_id: str, window: timedelta, exclude_case: int | None) -> int:
        """The customer's other credits within the window: issued, or awaiting a decision or
        issuing (SPEC 3). A failed case waits for a retry, so it counts too."""
        if window <= timedelta(0):
            return 0
        cur = await self.conn.execute(
            f"SELECT coalesce(sum(CASE WHEN state = 'issued' THEN coalesce(issued_cents, 0) ELSE credit_cents END), 0)"
            f" AS cents FROM {self.s}.cases WHERE customer_id = %s AND state = ANY(%s) AND id IS DISTINCT FROM %s"
            " AND coalesce(issued_at, created_at) >= now() - %s",
            (customer_id, list(HOLDING), exclude_case, window))
        return int((await cur.fetchone())["cents"])

    async def held_elsewhere(self, covered: list[dict], exclude_case: int | None) -> list[int]:
        """Cases other than exclude_case that hold any of these pieces (same record, time that
        meets; Polar's extra events are held separately from time)."""
        if not covered:
            return []
        cur = await self.conn.execute(
            f"""SELECT DISTINCT p.case_id FROM {self.s}.case_pieces p
                JOIN {self.s}.cases c ON c.id = p.case_id AND c.state = ANY(%s) AND c.id IS DISTINCT FROM %s
                JOIN unnest(%s::bigint[], %s::bigint[], %s::bigint[], %s::int[]) AS n(record_id, s, e, x)
                  ON n.record_id = p.record_id
                 AND ((n.x = 0 AND p.extra_events = 0 AND int8range(n.s, n.e) && int8range(p.start_us, p.end_us))
                   OR (n.x > 0 AND p.extra_events > 0))
                ORDER BY 1""",
            (list(HOLDING), exclude_case, [p["record_id"] for p in covered], [p["start"] for p in covered],
             [p["end"] for p in covered], [p["extra_events"] for p in covered]))
        return [r["case_id"] for r in await cur.fetchall()]

    async def insert(self, draft: Draft, *, required_level: int, exposure_cents: int,
                     remind_after_s: float | None, parent_case_id: int | None = None,
                     credit_cents: int | None = None) -> Case:
        r = draft.report
        credit = r["credit_cents"] if credit_cents is None else credit_cents
        cur = await self.conn.execute(
            f"""INSERT INTO {self.s}.cases (instance_id, org_id, customer_id, ticket_id, periods, proposed_cents,
                  credit_cents, required_level, systematic, kinds, report, approvers, requested_by, channel_id,
                  response_url, method, next_remind_at, state, fingerprint, exposure_cents, parent_case_id,
                  instance_ids, batch_id)
                VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,
                        now() + %s::float8 * interval '1 second',  -- NULL when no reminders
                        %s,%s,%s,%s,%s,%s)
                RETURNING *""",
            (r["instance_id"], r["org_id"], r["customer_id"], draft.ticket_id, r["periods"], credit, credit,
             required_level, r["systematic"], [f["kind"] for f in r["findings"]], json.dumps(r),
             json.dumps(draft.approvers), draft.requested_by, draft.channel_id, draft.response_url, draft.method,
             remind_after_s, "pending" if credit > 0 else "expired", draft.fingerprint, exposure_cents,
             parent_case_id, _report_instances(r), draft.batch_id))
        case = Case.from_row(await cur.fetchone())
        await self._pieces(case.id, draft.covered)
        await self.event(case.id, draft.requested_by, "opened",
                         {"credit_cents": credit, "required_level": required_level, "exposure_cents": exposure_cents})
        return case

    async def _pieces(self, case_id: int, covered: list[dict]) -> None:
        if covered:
            async with self.conn.cursor() as c2:
                await c2.executemany(
                    f"INSERT INTO {self.s}.case_pieces (case_id, kind, record_id, start_us, end_us, extra_events)"
                    " VALUES (%s,%s,%s,%s,%s,%s)",
                    [(case_id, p["kind"], p["record_id"], p["start"], p["end"], p["extra_events"]) for p in covered])

    async def replace_evidence(self, case_id: int, draft: Draft, *, required_level: int, exposure_cents: int,
                               actor: str, detail: dict, floor_cents: int = 0,
                               remind_after_s: float | None = None) -> Case | None:
        """The evidence changed: the case takes the new check's amount (never below what already
        moved, floor_cents), pieces and fingerprint and waits for a decision again, or expires
        when nothing is left and nothing moved."""
        credit = max(draft.report["credit_cents"], floor_cents)
        to_state = "pending" if credit > 0 else "expired"
        action: Action = "recheck" if credit > 0 else "expire"
        cur = await self.conn.execute(
            f"""UPDATE {self.s}.cases SET state = %s, proposed_cents = %s, credit_cents = %s, required_level = %s,
                  kinds = %s, report = %s, fingerprint = %s, exposure_cents = %s, decided_by = NULL,
                  decided_at = NULL, updated_at = now(), org_id = %s
                WHERE id = %s AND state = ANY(%s) RETURNING *""",
            (to_state, credit, credit, required_level, [f["kind"] for f in draft.report["findings"]],
             json.dumps(draft.report), draft.fingerprint, exposure_cents,
             # the org the new check read the instance in (it may have moved): later looks use it
             draft.report.get("org_id"), case_id, list(TRANSITIONS[action].sources)))
        row = await cur.fetchone()
        if row is None:
            return None
        await self.conn.execute(f"DELETE FROM {self.s}.case_pieces WHERE case_id = %s", (case_id,))
        if to_state == "pending":
            await self._pieces(case_id, draft.covered)
            if remind_after_s is not None:  # someone must decide again: the level is pinged until then
                cur = await self.conn.execute(
                    f"UPDATE {self.s}.cases SET next_remind_at = now() + %s * interval '1 second' WHERE id = %s"
                    " RETURNING *", (remind_after_s, case_id))
                row = await cur.fetchone()
        # failures of the amount replaced are history: a new approval starts from the new amount
        await self.conn.execute(f"UPDATE {self.s}.issuances SET failure_told = true WHERE case_id = %s"
                                " AND state = 'failed'", (case_id,))
        await self.event(case_id, actor, _EVENT[action], detail)
        return Case.from_row(row)

    async def move(self, case_id: int, action: Action, actor: str, detail: dict | None = None, **fields) -> Case | None:
        return await self.store._move(self.conn, case_id, action, actor, detail, fields)

    async def holders(self, instances: str | Iterable[str], exclude_case: int | None) -> tuple[int, ...]:
        """The cases that hold time of these instances now (SPEC 2.2), but exclude_case."""
        cur = await self.conn.execute(
            f"SELECT id FROM {self.s}.cases WHERE instance_ids && %s AND state = ANY(%s) AND id IS DISTINCT FROM %s"
            " ORDER BY id", (_ids(instances), list(HOLDING), exclude_case))
        return tuple(r["id"] for r in await cur.fetchall())

    async def remainder_of(self, parent_id: int) -> Case | None:
        cur = await self.conn.execute(f"SELECT * FROM {self.s}.cases WHERE parent_case_id = %s", (parent_id,))
        return _case(await cur.fetchone())

    async def set_message(self, case_id: int, channel_id: str | None, ts: str | None) -> Case:
        cur = await self.conn.execute(f"UPDATE {self.s}.cases SET channel_id = %s, message_ts = %s WHERE id = %s"
                                      " RETURNING *", (channel_id, ts, case_id))
        return _case(await cur.fetchone())

    async def set_exposure(self, case_id: int, exposure_cents: int, required_level: int) -> Case | None:
        cur = await self.conn.execute(
            f"UPDATE {self.s}.cases SET exposure_cents = %s, required_level = %s WHERE id = %s RETURNING *",
            (exposure_cents, required_level, case_id))
        return _case(await cur.fetchone())

    async def event(self, case_id: int, actor: str, action: str, detail: dict | None = None) -> None:
        await self.store._event(self.conn, case_id, actor, action, detail or {})

    async def store_adjust(self, case_id: int, cents: int, level: int, actor: str) -> Case | None:
        return await self.store._adjust(self.conn, case_id, cents, level, actor)

    async def moved_cents(self, case_id: int) -> int:
        """What may have reached the customer for this case, any method: confirmed by Polar, pending
        in Polar, or sent without an answer (an intent tried, its outcome unknown)."""
        cur = await self.conn.execute(
            f"SELECT coalesce(sum(amount_cents), 0) AS cents FROM {self.s}.issuances WHERE case_id = %s"
            " AND (state IN ('confirmed', 'pending') OR (state = 'intent' AND attempts > 0))", (case_id,))
        return int((await cur.fetchone())["cents"])

    async def case_pieces(self, case_id: int) -> list[dict]:
        cur = await self.conn.execute(
            f"SELECT record_id, start_us AS start, end_us AS end, extra_events FROM {self.s}.case_pieces"
            " WHERE case_id = %s", (case_id,))
        return await cur.fetchall()


class CaseStore(Store):
    """Cases and their audit trail."""

    @asynccontextmanager
    async def locked(self, customer_id: str, instances: str | Iterable[str]) -> AsyncIterator[CaseTx]:
        """A transaction holding the customer's lock, then each instance's in sorted order (always
        in that order, so two cases over overlapping instances never wait on each other in a
        circle): two replicas never claim the same billed time, and exposure is read while no
        other decision for the customer is in flight."""
        async with self._conn() as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (CUSTOMER_LOCKS, customer_id))
                for instance_id in _ids(instances):
                    await conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (INSTANCE_LOCKS, instance_id))
                yield CaseTx(self, conn)

    async def get(self, case_id: int) -> Case | None:
        async with self._conn() as conn:
            cur = await conn.execute(f"SELECT * FROM {self.s}.cases WHERE id = %s", (case_id,))
            return _case(await cur.fetchone())

    async def set_message(self, case_id: int, channel_id: str, ts: str) -> Case:
        async with self._conn() as conn:
            cur = await conn.execute(f"UPDATE {self.s}.cases SET channel_id = %s, message_ts = %s, updated_at = now()"
                                     " WHERE id = %s RETURNING *", (channel_id, ts, case_id))
            return _case(await cur.fetchone())

    async def move(self, case_id: int, action: Action, actor: str, detail: dict | None = None, **fields) -> Case | None:
        """Move the case by the table; None if it is not in one of the action's source states
        (someone else moved it first)."""
        async with self._conn() as conn:
            async with conn.transaction():
                return await self._move(conn, case_id, action, actor, detail, fields)

    async def _move(self, conn, case_id: int, action: Action, actor: str, detail: dict | None, fields: dict) -> Case | None:
        m = TRANSITIONS[action]
        sets = ["state = %s", "updated_at = now()"]
        values: list = [m.target]
        for k, v in fields.items():
            if k not in MOVE_FIELDS:
                raise ValueError(k)
            sets.append(f"{k} = %s")
            values.append(v)
        if m.target in ("approved", "rejected") and m.by == "person":
            sets.append("decided_at = now()")
        if m.target == "issued":
            sets.append("issued_at = now()")
        if action == "mark_failed":
            sets.append("failures = failures + 1")
        if m.target != "pending":
            sets.append("next_remind_at = NULL")
        cur = await conn.execute(
            f"UPDATE {self.s}.cases SET {', '.join(sets)} WHERE id = %s AND state = ANY(%s) RETURNING *",
            (*values, case_id, list(m.sources)))
        row = await cur.fetchone()
        if row is not None:
            await self._event(conn, case_id, actor, _EVENT.get(action, action), detail or {})
        return _case(row)

    async def _adjust(self, conn, case_id: int, cents: int, level: int, actor: str) -> Case | None:
        """Lower the amount of a pending case (never raise it, never to zero)."""
        cur = await conn.execute(
            f"UPDATE {self.s}.cases SET credit_cents = %s, required_level = %s, updated_at = now()"
            " WHERE id = %s AND state = 'pending' AND %s <= credit_cents AND %s > 0 RETURNING *",
            (cents, level, case_id, cents, cents))
        row = await cur.fetchone()
        if row is not None:
            await self._event(conn, case_id, actor, "adjusted", {"credit_cents": cents, "required_level": level})
        return _case(row)

    async def finish_issued(self, case: Case, *, issued: int, refs: list[str], remainder: int, leading_kind: str,
                            notes: str) -> Case | None:
        """issuing -> issued and the case's one billing_corrections row, in one transaction."""
        async with self._conn() as conn:
            async with conn.transaction():
                row = await self._move(conn, case.id, "mark_issued", "billing-bot",
                                       {"issued_cents": issued, "refs": refs, "remainder_cents": remainder},
                                       {"issued_cents": issued, "polar_reference": ", ".join(refs),
                                        "remainder_cents": remainder})
                if row is None:
                    return None
                await conn.execute(
                    "INSERT INTO billing_corrections (customer_id, ticket_id, issue_type, credit_amount, resolved_by,"
                    " resolved_at, notes) VALUES (%s, %s, %s, %s::numeric / 100, %s, now(), %s)",
                    (case.customer_id, case.ticket_id, leading_kind, issued, case.decided_by or "billing-bot", notes))
                return row

    async def remainder_case(self, parent_id: int) -> Case | None:
        async with self._conn() as conn:
            cur = await conn.execute(f"SELECT * FROM {self.s}.cases WHERE parent_case_id = %s", (parent_id,))
            return _case(await cur.fetchone())

    async def mark_notified(self, case_id: int) -> None:
        async with self._conn() as conn:
            await conn.execute(f"UPDATE {self.s}.cases SET notified = true WHERE id = %s", (case_id,))

    async def event(self, case_id: int, actor: str, action: str, detail: dict | None = None) -> None:
        async with self._conn() as conn:
            await self._event(conn, case_id, actor, action, detail or {})

    async def _event(self, conn, case_id: int, actor: str, action: str, detail: dict) -> None:
        await conn.execute(f"INSERT INTO {self.s}.case_events (case_id, actor, action, detail) VALUES (%s,%s,%s,%s)",
                           (case_id, actor, action, json.dumps(detail)))

    async def events(self, case_id: int) -> list[dict]:
        async with self._conn() as conn:
            cur = await conn.execute(f"SELECT * FROM {self.s}.case_events WHERE case_id = %s ORDER BY id", (case_id,))
            return await cur.fetchall()

    async def event_once(self, case_id: int, actor: str, action: str, key: str, detail: dict) -> bool:
        """Record an event unless one with this action and detail.key already exists (a webhook
        told twice, refund.created then refund.updated). True when recorded now."""
        async with self._conn() as conn:
            cur = await conn.execute(
                f"""INSERT INTO {self.s}.case_events (case_id, actor, action, detail)
                    SELECT %s, %s, %s, %s WHERE NOT EXISTS (
                      SELECT 1 FROM {self.s}.case_events WHERE case_id = %s AND action = %s AND detail->>'key' = %s)
                    RETURNING id""",
                (case_id, actor, action, json.dumps({**detail, "key": key}), case_id, action, key))
            return await cur.fetchone() is not None

    async def cases_with_order(self, order_id: str) -> list[int]:
        """The cases whose refunds went to this order."""
        async with self._conn() as conn:
            cur = await conn.execute(f"SELECT DISTINCT case_id FROM {self.s}.issuances WHERE target = %s"
                                     " AND method = 'refund' ORDER BY case_id", (order_id,))
            return [r["case_id"] for r in await cur.fetchall()]

    async def has_event(self, case_id: int, action: str) -> bool:
        async with self._conn() as conn:
            cur = await conn.execute(f"SELECT 1 FROM {self.s}.case_events WHERE case_id = %s AND action = %s LIMIT 1",
                                     (case_id, action))
            return await cur.fetchone() is not None

    async def claim_due_reminders(self, every_s: float, limit: int = 20) -> list[Case]:
        """Pending cases whose reminder is due, claimed for this interval across all replicas: the
        rows are locked with SKIP LOCKED, pushed forward and committed before anyone is pinged,
        so Slack is never called while case rows are locked."""
        async with self._conn() as conn:
            async with conn.transaction():
                cur = await conn.execute(
                    f"""UPDATE {self.s}.cases c SET next_remind_at = now() + %s * interval '1 second',
                          reminders = c.reminders + 1
                        WHERE c.id IN (SELECT id FROM {self.s}.cases WHERE state = 'pending' AND next_remind_at <= now()
                                       ORDER BY next_remind_at LIMIT %s FOR UPDATE SKIP LOCKED)
                        RETURNING c.*""", (every_s, limit))
                due = [Case.from_row(r) for r in await cur.fetchall()]
                for case in due:
                    await self._event(conn, case.id, "billing-bot", "reminded", {"reminder": case.reminders})
        return due

    async def claim_unfinished(self, older_than_s: float, limit: int = 20) -> list[int]:
        """Approved or issuing cases, and issued ones not yet announced, untouched for a while:
        claimed with SKIP LOCKED and stamped, so replicas share the sweep instead of repeating it."""
        async with self._conn() as conn:
            async with conn.transaction():
                cur = await conn.execute(
                    f"""UPDATE {self.s}.cases c SET swept_at = now()
                        WHERE c.id IN (SELECT id FROM {self.s}.cases
                                       WHERE (state IN ('approved', 'issuing') OR (state = 'issued' AND NOT notified))
                                         AND updated_at <= now() - %s * interval '1 second'
                                         AND (swept_at IS NULL OR swept_at <= now() - %s * interval '1 second')
                                       ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)
                        RETURNING c.id""", (older_than_s, older_than_s, limit))
                return sorted(r["id"] for r in await cur.fetchall())

    async def try_lock_case(self, case_id: int) -> bool:
        """A session lock on the bound connection: one issuing worker per case, on any replica."""
        async with self._conn() as conn:
            cur = await conn.execute("SELECT pg_try_advisory_lock(%s, %s) AS ok", (CASE_LOCKS, case_id))
            return (await cur.fetchone())["ok"]

    async def unlock_case(self, case_id: int) -> None:
        async with self._conn() as conn:
            await conn.execute("SELECT pg_advisory_unlock(%s, %s)", (CASE_LOCKS, case_id))

    async def open_cases_by(self, user: str, limit: int = 20) -> list[Case]:
        async with self._conn() as conn:
            cur = await conn.execute(
                f"SELECT * FROM {self.s}.cases WHERE requested_by = %s AND state = ANY(%s) ORDER BY id DESC LIMIT %s",
                (user, list(OPEN), limit))
            return [Case.from_row(r) for r in await cur.fetchall()]

    async def pending(self, limit: int = 50) -> list[Case]:
        async with self._conn() as conn:
            cur = await conn.execute(f"SELECT * FROM {self.s}.cases WHERE state = 'pending' ORDER BY id LIMIT %s",
                                     (limit,))
            return [Case.from_row(r) for r in await cur.fetchall()]

    async def batch_summary(self, batch_id: int) -> dict | None:
        """A remediation batch's kind and period (for the credits review)."""
        async with self._conn() as conn:
            if not await table_exists(conn, f"{self.s}.remediation_batches"):
                return None
            cur = await conn.execute(f"SELECT id, kind, period, state FROM {self.s}.remediation_batches WHERE id = %s",
                                     (batch_id,))
            return await cur.fetchone()

    async def pieces(self, case_id: int) -> list[dict]:
        """The case's pieces with the billed tier of their record (for compensating events)."""
        async with self._conn() as conn:
            cur = await conn.execute(
                f"SELECT p.kind, p.record_id, p.start_us, p.end_us, p.extra_events, r.tier, r.instance_id, r.org_id"
                f" FROM {self.s}.case_pieces p JOIN billing_records r ON r.id = p.record_id"
                " WHERE p.case_id = %s ORDER BY p.record_id, p.start_us", (case_id,))
            return await cur.fetchall()

    async def credits_rows(self, lo) -> tuple[list[dict], int, list[dict]]:
        """For the credits review: (issued cases by level, refused attempts, rejected cases) since lo."""
        async with self._conn() as conn:
            if not await table_exists(conn, f"{self.s}.cases"):
                return [], 0, []
            cur = await conn.execute(
                f"SELECT required_level, count(*) AS n, coalesce(sum(issued_cents), 0) AS cents FROM {self.s}.cases"
                " WHERE state = 'issued' AND issued_at >= %s GROUP BY required_level ORDER BY required_level", (lo,))
            by_level = await cur.fetchall()
            cur = await conn.execute(
                f"SELECT count(*) AS n FROM {self.s}.case_events WHERE action = 'refused' AND at >= %s", (lo,))
            refusals = (await cur.fetchone())["n"]
            cur = await conn.execute(
                f"SELECT id, coalesce(instance_id, customer_id || ' (' || cardinality(instance_ids) || ' instances)')"
                f" AS instance_id, decided_by, reason FROM {self.s}.cases WHERE state = 'rejected'"
                " AND decided_at >= %s ORDER BY id", (lo,))
            return by_level, refusals, await cur.fetchall()


# The audit trail keeps the words it always used for these moves.
_EVENT = {"approve": "approved", "reject": "rejected", "expire": "expired", "recheck": "rechecked",
          "start_issuing": "issuing", "mark_issued": "issued", "mark_failed": "failed", "retry": "retried",
          "switch_method": "switched_method"}


class Outbox:
    """Money movements, recorded before any call to Polar (services/issuing.py)."""

    def __init__(self, store: Store):
        self.store, self.s = store, store.s

    async def intend(self, case_id: int, method: str, target: str, period: str | None, cents: int) -> dict:
        """The intent for (case, target); an existing one wins, so a resumed run keeps its amount."""
        async with self.store._conn() as conn:
            await conn.execute(
                f"INSERT INTO {self.s}.issuances (case_id, method, target, period, amount_cents)"
                " VALUES (%s,%s,%s,%s,%s) ON CONFLICT (case_id, target) DO NOTHING",
                (case_id, method, target, period, cents))
            cur = await conn.execute(f"SELECT * FROM {self.s}.issuances WHERE case_id = %s AND target = %s",
                                     (case_id, target))
            return await cur.fetchone()

    async def for_case(self, case_id: int) -> list[dict]:
        async with self.store._conn() as conn:
            cur = await conn.execute(f"SELECT * FROM {self.s}.issuances WHERE case_id = %s ORDER BY id", (case_id,))
            return await cur.fetchall()

    async def attempt(self, issuance_id: int) -> None:
        """Counted before each POST, so a crash mid-call still shows the attempt."""
        async with self.store._conn() as conn:
            await conn.execute(f"UPDATE {self.s}.issuances SET attempts = attempts + 1, updated_at = now()"
                               " WHERE id = %s", (issuance_id,))

    async def note_error(self, issuance_id: int, error: str) -> None:
        async with self.store._conn() as conn:
            await conn.execute(f"UPDATE {self.s}.issuances SET last_error = %s, updated_at = now() WHERE id = %s",
                               (error, issuance_id))

    async def confirm(self, issuance_id: int, polar_ref: str) -> None:
        async with self.store._conn() as conn:
            await conn.execute(f"UPDATE {self.s}.issuances SET state = 'confirmed', polar_ref = %s, updated_at = now()"
                               " WHERE id = %s", (polar_ref, issuance_id))

    async def fail(self, issuance_id: int, error: str) -> None:
        async with self.store._conn() as conn:
            await conn.execute(f"UPDATE {self.s}.issuances SET state = 'failed', last_error = %s, updated_at = now()"
                               " WHERE id = %s AND state = 'intent'", (error, issuance_id))

    async def settle(self, issuance_id: int, state: str, polar_ref: str, refund_status: str | None) -> bool:
        """What Polar says of the intent's refund. Only news of the intent's own refund counts (a
        reopened intent's earlier refunds are history); a confirmed refund never goes back here (a
        reversal is told, not undone: services/issuing.py); a refund Polar already reported failed
        is not revived by an older 'pending' that arrives late; and a refund that is pending or
        succeeded replaces a failed one the intent was tied to (an earlier attempt's failure can
        arrive while the next POST runs), the failed one becoming history. True when it changed."""
        async with self.store._conn() as conn:
            cur = await conn.execute(
                f"""UPDATE {self.s}.issuances SET state = %(state)s, polar_ref = %(ref)s, refund_status = %(rs)s,
                      old_refs = CASE WHEN polar_ref IS NOT NULL AND polar_ref <> %(ref)s
                                      THEN array_append(old_refs, polar_ref) ELSE old_refs END,
                      failure_told = CASE WHEN polar_ref IS DISTINCT FROM %(ref)s THEN false ELSE failure_told END,
                      updated_at = now()
                    WHERE id = %(id)s AND state <> 'confirmed' AND NOT (%(ref)s = ANY(old_refs))
                      AND (polar_ref IS NULL OR polar_ref = %(ref)s
                           OR (state = 'failed' AND %(state)s IN ('pending', 'confirmed')))
                      AND NOT (state = 'failed' AND polar_ref = %(ref)s AND %(state)s = 'pending')
                    RETURNING id""",
                {"state": state, "ref": polar_ref, "rs": refund_status, "id": issuance_id})
            return await cur.fetchone() is not None

    async def reopen(self, issuance_id: int, cents: int) -> dict:
        """A failed intent tried again (a retry after Polar refused or failed it): a new amount; its
        earlier refund becomes history."""
        async with self.store._conn() as conn:
            cur = await conn.execute(
                f"UPDATE {self.s}.issuances SET state = 'intent', amount_cents = %s, polar_ref = NULL,"
                " old_refs = CASE WHEN polar_ref IS NULL THEN old_refs ELSE array_append(old_refs, polar_ref) END,"
                " refund_status = NULL, failure_told = false, attempts = 0, updated_at = now()"
                " WHERE id = %s AND state = 'failed' RETURNING *", (cents, issuance_id))
            return await cur.fetchone()

    async def reamount(self, issuance_id: int, cents: int) -> dict | None:
        """An intent never tried (attempts 0: no POST of it was ever sent) takes a new amount; None
        when it was tried meanwhile."""
        async with self.store._conn() as conn:
            cur = await conn.execute(
                f"UPDATE {self.s}.issuances SET amount_cents = %s, updated_at = now()"
                " WHERE id = %s AND state = 'intent' AND attempts = 0 RETURNING *", (cents, issuance_id))
            return await cur.fetchone()

    async def mark_failure_told(self, issuance_id: int) -> None:
        async with self.store._conn() as conn:
            await conn.execute(f"UPDATE {self.s}.issuances SET failure_told = true WHERE id = %s", (issuance_id,))

    async def by_refund(self, refund_id: str, case_id: int | None, order_id: str | None) -> dict | None:
        """The intent a Polar refund of ours belongs to: the one whose refund it is, else the
        case's intent on that order still waiting for its refund's id (a POST whose answer was lost).
        A refund the intent tried before a retry matches nothing: its news is history."""
        async with self.store._conn() as conn:
            cur = await conn.execute(
                f"SELECT * FROM {self.s}.issuances WHERE method = 'refund' AND NOT (%s = ANY(old_refs))"
                " AND (polar_ref = %s OR (polar_ref IS NULL AND case_id = %s AND target = %s))"
                " ORDER BY (polar_ref IS NOT DISTINCT FROM %s) DESC LIMIT 1",
                (refund_id, refund_id, case_id, order_id, refund_id))
            return await cur.fetchone()


class Books(Store):
    """What the bot's own books check reads of the bot's tables (services/books.py)."""

    async def issued_between(self, conn, lo, hi) -> dict[int, dict]:
        """Cases issued in [lo, hi) with their issuances, in the caller's snapshot; {} before the
        bot's schema exists."""
        if not await table_exists(conn, f"{self.s}.cases"):
            return {}
        cur = await conn.execute(
            f"SELECT id, instance_id, org_id, customer_id, state, issued_cents, method, issued_at, polar_reference"
            f" FROM {self.s}.cases WHERE state = 'issued' AND issued_at >= %s AND issued_at < %s ORDER BY id", (lo, hi))
        cases = {r["id"]: {**r, "issuances": []} for r in await cur.fetchall()}
        cur = await conn.execute(
            f"SELECT case_id, method, target, amount_cents, state, polar_ref FROM {self.s}.issuances"
            " WHERE case_id = ANY(%s) ORDER BY id", (list(cases),))
        for i in await cur.fetchall():
            cases[i["case_id"]]["issuances"].append(i)
        return cases

    async def states(self, case_ids: list[int]) -> dict[int, str]:
        async with self._conn() as conn:
            cur = await conn.execute(f"SELECT id, state FROM {self.s}.cases WHERE id = ANY(%s)", (case_ids,))
            return {r["id"]: r["state"] for r in await cur.fetchall()}


class WebhookDeliveries(Store):
    """Polar webhook deliveries already handled, by webhook-id (a repeated delivery is a no-op)."""

    async def first_time(self, webhook_id: str, event_type: str | None = None) -> bool:
        """Record the delivery; True if it was not recorded before. One statement, so two
        replicas receiving the same delivery at once get one True between them."""
        async with self._conn() as conn:
            cur = await conn.execute(
                f"INSERT INTO {self.s}.polar_webhook_deliveries (webhook_id, event_type) VALUES (%s, %s)"
                " ON CONFLICT (webhook_id) DO NOTHING RETURNING webhook_id", (webhook_id, event_type))
            return await cur.fetchone() is not None

    async def forget(self, webhook_id: str) -> None:
        """Undo first_time when handling failed, so Polar's retry is handled, not taken for a repeat."""
        async with self._conn() as conn:
            await conn.execute(f"DELETE FROM {self.s}.polar_webhook_deliveries WHERE webhook_id = %s", (webhook_id,))



class Watchlist(Store):
    """Customers on the watchlist (migration 030): `/billing-watch`, `billing-bot watch`, and the
    morning message, which lists their anomalies first."""

    async def add(self, customer_id: str, reason: str | None, added_by: str) -> bool:
        """True when added now; a customer already watched keeps its first reason (False)."""
        await self.migrate()
        async with self._conn() as conn:
            cur = await conn.execute(
                f"INSERT INTO {self.s}.watchlist (customer_id, reason, added_by) VALUES (%s, %s, %s)"
                " ON CONFLICT (customer_id) DO NOTHING RETURNING customer_id", (customer_id, reason, added_by))
            found = await cur.fetchone() is not None
            return found

    async def add_many(self, customer_ids: Iterable[str], reason: str | None, added_by: str) -> None:
        """add() for many customers in one statement (a batch's); those already watched keep theirs."""
        await self.migrate()
        async with self._conn() as conn:
            await conn.execute(
                f"INSERT INTO {self.s}.watchlist (customer_id, reason, added_by)"
                " SELECT unnest(%s::text[]), %s, %s ON CONFLICT (customer_id) DO NOTHING",
                (list(customer_ids), reason, added_by))

    async def remove(self, customer_id: str) -> bool:
        """True when the customer was on the list."""
        async with self._conn() as conn:
            if not await table_exists(conn, f"{self.s}.watchlist"):
                return False
            cur = await conn.execute(f"DELETE FROM {self.s}.watchlist WHERE customer_id = %s RETURNING customer_id",
                                     (customer_id,))
            found = await cur.fetchone() is not None
            return found

    async def list(self) -> list[dict]:
        """Every watched customer, oldest first; [] before the bot's schema has the table."""
        async with self._conn() as conn:
            if not await table_exists(conn, f"{self.s}.watchlist"):
                return []
            cur = await conn.execute(f"SELECT customer_id, reason, added_by, added_at FROM {self.s}.watchlist"
                                     " ORDER BY added_at, customer_id")
            rows = await cur.fetchall()
            return rows


BATCH_LOCKS = 7_242_005  # pg_try_advisory_lock(space, batch id): one process opens a batch's cases
PROGRESS_LOCKS = 7_242_006  # and one posts its progress message (while the cases are still being opened)


class Batches(Store):
    """Remediation batches (SPEC 5.3): the plan, its one approval, and the progress of its cases."""

    async def insert(self, *, kind: str, period: str, fingerprint: str, total_cents: int, required_level: int,
                     plan: dict, requested_by: str, channel_id: str | None = None) -> dict:
        async with self._conn() as conn:
            cur = await conn.execute(
                f"""INSERT INTO {self.s}.remediation_batches (kind, period, fingerprint, total_cents, required_level,
                      plan, requested_by, channel_id) VALUES (%s,%s,%s,%s,%s,%s,%s,%s) RETURNING *""",
                (kind, period, fingerprint, total_cents, required_level, json.dumps(plan), requested_by, channel_id))
            return await cur.fetchone()

    async def get(self, batch_id: int) -> dict | None:
        async with self._conn() as conn:
            cur = await conn.execute(f"SELECT * FROM {self.s}.remediation_batches WHERE id = %s", (batch_id,))
            return await cur.fetchone()

    async def set_message(self, batch_id: int, channel_id: str, ts: str) -> None:
        async with self._conn() as conn:
            await conn.execute(f"UPDATE {self.s}.remediation_batches SET channel_id = %s, message_ts = %s,"
                               " updated_at = now() WHERE id = %s", (channel_id, ts, batch_id))

    async def approve(self, batch_id: int, fingerprint: str, user: str, levels: tuple[int, ...]) -> dict | None:
        """planned -> approved, only if still planned and bound to this fingerprint: a double
        click, two approvers or two replicas give one approval."""
        async with self._conn() as conn:
            cur = await conn.execute(
                f"""UPDATE {self.s}.remediation_batches SET state = 'approved', decided_by = %s, decided_levels = %s,
                      decided_at = now(), updated_at = now()
                    WHERE id = %s AND state = 'planned' AND fingerprint = %s RETURNING *""",
                (user, list(levels), batch_id, fingerprint))
            return await cur.fetchone()

    async def supersede(self, batch_id: int, by: int) -> dict | None:
        async with self._conn() as conn:
            cur = await conn.execute(
                f"UPDATE {self.s}.remediation_batches SET state = 'superseded', superseded_by = %s, updated_at = now()"
                " WHERE id = %s AND state = 'planned' RETURNING *", (by, batch_id))
            return await cur.fetchone()

    async def reject(self, batch_id: int, user: str, reason: str) -> dict | None:
        async with self._conn() as conn:
            cur = await conn.execute(
                f"""UPDATE {self.s}.remediation_batches SET state = 'rejected', decided_by = %s, reason = %s,
                      decided_at = now(), updated_at = now(), finished = true
                    WHERE id = %s AND state = 'planned' RETURNING *""", (user, reason, batch_id))
            return await cur.fetchone()

    async def mark_opened(self, batch_id: int) -> None:
        async with self._conn() as conn:
            await conn.execute(f"UPDATE {self.s}.remediation_batches SET cases_opened = true, updated_at = now()"
                               " WHERE id = %s", (batch_id,))

    async def unopened(self) -> list[dict]:
        """Approved batches some of whose customers may have no case yet (a crash cut the opening)."""
        async with self._conn() as conn:
            cur = await conn.execute(f"SELECT * FROM {self.s}.remediation_batches WHERE state = 'approved'"
                                     " AND NOT cases_opened ORDER BY id")
            return await cur.fetchall()

    async def unfinished(self) -> list[dict]:
        async with self._conn() as conn:
            cur = await conn.execute(f"SELECT * FROM {self.s}.remediation_batches WHERE state = 'approved'"
                                     " AND NOT finished ORDER BY id")
            return await cur.fetchall()

    @asynccontextmanager
    async def locked(self, batch_id: int, what: str = "opening") -> AsyncIterator[bool]:
        """A session lock on a connection of its own, held while the body runs (which uses other
        connections, several at once): True when this process got it. Dies with the process.
        what: "opening" (the batch's cases) or "progress" (its message): two locks, so the
        progress is shown while the cases are still being opened."""
        space = {"opening": BATCH_LOCKS, "progress": PROGRESS_LOCKS}[what]
        async with self.db.pool.connection() as conn:
            cur = await conn.execute("SELECT pg_try_advisory_lock(%s, %s) AS ok", (space, batch_id))
            got = (await cur.fetchone())["ok"]
            try:
                yield got
            finally:
                if got:
                    await conn.execute("SELECT pg_advisory_unlock(%s, %s)", (space, batch_id))

    async def cases(self, batch_id: int, remainders: bool = False) -> list[Case]:
        """The batch's cases (one per customer), and with remainders the cases offering what a
        customer's order could not take."""
        async with self._conn() as conn:
            cur = await conn.execute(f"SELECT * FROM {self.s}.cases WHERE batch_id = %s"
                                     " AND (%s OR parent_case_id IS NULL) ORDER BY id", (batch_id, remainders))
            return [Case.from_row(r) for r in await cur.fetchall()]

    async def claim_progress(self, batch_id: int, text: str, finished: bool) -> bool:
        """Record what the progress message is about to say; False when it already says that
        (nothing to post) — one replica posts each change."""
        async with self._conn() as conn:
            cur = await conn.execute(
                f"""UPDATE {self.s}.remediation_batches SET progress_text = %s, finished = finished OR %s,
                      updated_at = now()
                    WHERE id = %s AND progress_text IS DISTINCT FROM %s RETURNING id""",
                (text, finished, batch_id, text))
            return await cur.fetchone() is not None

    async def release_progress(self, batch_id: int) -> None:
        """Posting failed: forget what was claimed, so the next tick posts it again."""
        async with self._conn() as conn:
            await conn.execute(f"UPDATE {self.s}.remediation_batches SET progress_text = NULL, finished = false"
                               " WHERE id = %s", (batch_id,))

    async def set_progress_ts(self, batch_id: int, ts: str) -> None:
        async with self._conn() as conn:
            await conn.execute(f"UPDATE {self.s}.remediation_batches SET progress_ts = %s WHERE id = %s",
                               (ts, batch_id))
