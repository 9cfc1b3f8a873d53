"""The bot's own state in PostgreSQL (its own schema): migrations, cases, audit, outbox, reconciliations.

Migrations run at start under an advisory lock, so several replicas starting at once apply each
file once.
"""
from __future__ import annotations

import json
from pathlib import Path

from services.db import Database

MIGRATIONS = Path(__file__).parent / "sql" / "migrations"
LOCK_KEY = 7_242_001  # pg_advisory_xact_lock key for migrations


class Store:
    def __init__(self, db: Database):
        self.db = db
        self.s = db.schema  # validated identifier (services.config)

    async def migrate(self) -> list[str]:
        applied = []
        async with self.db.pool.connection() as conn:
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
        return applied

    async def record_reconciliation(self, rec, *, run_key: str | None = None, shards: int = 1) -> int | None:
        """Store a whole day's run, its totals and, per finding kind, how many customers it touched
        (SPEC 2.4). With a run_key (the merge of a sharded run) at most one process stores it: the
        unique index decides, and the others get None."""
        await self.migrate()
        period = rec.day.strftime("%Y-%m")
        async with self.db.pool.connection() as conn:
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
        return run_id


STATES = ("pending", "approved", "issuing", "issued", "rejected", "failed", "expired")


class CaseStore(Store):
    """Cases and their audit trail. Every state change is one conditional UPDATE, so two approvers
    pressing at once, a double click or a Slack retry yield exactly one transition."""

    async def create_case(self, *, report: dict, covered: list[dict], requested_by: str, ticket_id: str | None,
                          channel_id: str | None, approvers: dict, method: str, remind_after_s: float | None) -> dict:
        async with self.db.pool.connection() as conn:
            async with conn.transaction():
                cur = await conn.execute(
                    f"""INSERT INTO {self.s}.cases (instance_id, org_id, customer_id, ticket_id, periods, proposed_cents,
                          credit_cents, required_level, systematic, kinds, report, approvers, requested_by,
                          channel_id, method, next_remind_at, state)
                        VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,
                                now() + %s::float8 * interval '1 second',  -- NULL when no reminders
                                %s)
                        RETURNING *""",
                    (report["instance_id"], report["org_id"], report["customer_id"], ticket_id, report["periods"],
                     report["credit_cents"], report["credit_cents"], report["required_level"], report["systematic"],
                     [f["kind"] for f in report["findings"]], json.dumps(report), json.dumps(approvers), requested_by,
                     channel_id, method, remind_after_s,
                     "pending" if report["credit_cents"] > 0 else "expired"))
                case = await cur.fetchone()
                if covered:
                    async with conn.cursor() as c2:
                        await c2.executemany(
                            f"INSERT INTO {self.s}.case_pieces (case_id, kind, record_id, start_us, end_us, extra_events)"
                            " VALUES (%s,%s,%s,%s,%s,%s)",
                            [(case["id"], p["kind"], p["record_id"], p["start"], p["end"], p["extra_events"])
                             for p in covered])
                await self._event(conn, case["id"], requested_by, "opened",
                                  {"credit_cents": report["credit_cents"], "required_level": report["required_level"]})
        return case

    async def get(self, case_id: int) -> dict | None:
        async with self.db.pool.connection() as conn:
            cur = await conn.execute(f"SELECT * FROM {self.s}.cases WHERE id = %s", (case_id,))
            return await cur.fetchone()

    async def set_message(self, case_id: int, channel_id: str, ts: str) -> dict:
        async with self.db.pool.connection() as conn:
            cur = await conn.execute(f"UPDATE {self.s}.cases SET channel_id = %s, message_ts = %s, updated_at = now()"
                                     " WHERE id = %s RETURNING *", (channel_id, ts, case_id))
            return await cur.fetchone()

    async def transition(self, case_id: int, from_states: tuple[str, ...], to_state: str, actor: str,
                         action: str, detail: dict | None = None, **fields) -> dict | None:
        """Move the case if it is in one of from_states; None if someone else moved it first."""
        sets = ["state = %s", "updated_at = now()"]
        values: list = [to_state]
        for k, v in fields.items():
            if k not in {"decided_by", "reason", "method", "credit_cents", "required_level", "issued_cents",
                         "next_remind_at"}:
                raise ValueError(k)
            sets.append(f"{k} = %s")
            values.append(v)
        if to_state in ("approved", "rejected"):
            sets.append("decided_at = now()")
        if to_state == "issued":
            sets.append("issued_at = now()")
        if to_state != "pending":
            sets.append("next_remind_at = NULL")
        async with self.db.pool.connection() as conn:
            async with conn.transaction():
                cur = await conn.execute(
                    f"UPDATE {self.s}.cases SET {', '.join(sets)} WHERE id = %s AND state = ANY(%s) RETURNING *",
                    (*values, case_id, list(from_states)))
                row = await cur.fetchone()
                if row is not None:
                    await self._event(conn, case_id, actor, action, detail or {})
                return row

    async def adjust(self, case_id: int, cents: int, level: int, actor: str) -> dict | None:
        """Lower the amount of a pending case (never raise it)."""
        async with self.db.pool.connection() as conn:
            async with conn.transaction():
                cur = await conn.execute(
                    f"UPDATE {self.s}.cases SET credit_cents = %s, required_level = %s, updated_at = now()"
                    " WHERE id = %s AND state = 'pending' AND %s <= credit_cents AND %s > 0 RETURNING *",
                    (cents, level, case_id, cents, cents))
                row = await cur.fetchone()
                if row is not None:
                    await self._event(conn, case_id, actor, "adjusted", {"credit_cents": cents, "required_level": level})
                return row

    async def event(self, case_id: int, actor: str, action: str, detail: dict | None = None) -> None:
        async with self.db.pool.connection() as conn:
            await self._event(conn, case_id, actor, action, detail or {})

    async def _event(self, conn, case_id: int, actor: str, action: str, detail: dict) -> None:
        await conn.execute(f"INSERT INTO {self.s}.case_events (case_id, actor, action, detail) VALUES (%s,%s,%s,%s)",
                           (case_id, actor, action, json.dumps(detail)))

    async def events(self, case_id: int) -> list[dict]:
        async with self.db.pool.connection() as conn:
            cur = await conn.execute(f"SELECT * FROM {self.s}.case_events WHERE case_id = %s ORDER BY id", (case_id,))
            return await cur.fetchall()

    async def claim_due_reminders(self, every_s: float, handle) -> int:
        """Re-ping each pending case whose reminder is due, once per interval across all replicas:
        rows are locked with SKIP LOCKED and pushed forward in the same transaction."""
        done = 0
        async with self.db.pool.connection() as conn:
            async with conn.transaction():
                cur = await conn.execute(
                    f"SELECT * FROM {self.s}.cases WHERE state = 'pending' AND next_remind_at <= now()"
                    " ORDER BY next_remind_at LIMIT 20 FOR UPDATE SKIP LOCKED")
                for case in await cur.fetchall():
                    await handle(case)
                    await conn.execute(
                        f"UPDATE {self.s}.cases SET next_remind_at = now() + %s * interval '1 second',"
                        " reminders = reminders + 1 WHERE id = %s", (every_s, case["id"]))
                    await self._event(conn, case["id"], "billing-bot", "reminded", {"reminder": case["reminders"] + 1})
                    done += 1
        return done

    async def open_cases_by(self, user: str, limit: int = 20) -> list[dict]:
        async with self.db.pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT * FROM {self.s}.cases WHERE requested_by = %s AND state IN ('pending','approved','issuing','failed')"
                " ORDER BY id DESC LIMIT %s", (user, limit))
            return await cur.fetchall()

    async def pending(self, limit: int = 50) -> list[dict]:
        async with self.db.pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT * FROM {self.s}.cases WHERE state = 'pending' ORDER BY id LIMIT %s", (limit,))
            return await cur.fetchall()


class Outbox:
    """Money movements, recorded before any call to Polar (services/issuing.py)."""

    def __init__(self, store: Store):
        self.db, self.s = store.db, store.s

    async def intend(self, case_id: int, method: str, target: str, period: str | None, cents: int) -> dict:
        """The intent for (case, target); an existing one wins, so a resumed run keeps its amount."""
        async with self.db.pool.connection() as conn:
            await conn.execute(
                f"INSERT INTO {self.s}.issuances (case_id, method, target, period, amount_cents)"
                " VALUES (%s,%s,%s,%s,%s) ON CONFLICT (case_id, target) DO NOTHING",
                (case_id, method, target, period, cents))
            cur = await conn.execute(f"SELECT * FROM {self.s}.issuances WHERE case_id = %s AND target = %s",
                                     (case_id, target))
            return await cur.fetchone()

    async def for_case(self, case_id: int) -> list[dict]:
        async with self.db.pool.connection() as conn:
            cur = await conn.execute(f"SELECT * FROM {self.s}.issuances WHERE case_id = %s ORDER BY id", (case_id,))
            return await cur.fetchall()

    async def attempt(self, issuance_id: int) -> None:
        """Counted before each POST, so a crash mid-call still shows the attempt."""
        async with self.db.pool.connection() as conn:
            await conn.execute(f"UPDATE {self.s}.issuances SET attempts = attempts + 1, updated_at = now()"
                               " WHERE id = %s", (issuance_id,))

    async def note_error(self, issuance_id: int, error: str) -> None:
        async with self.db.pool.connection() as conn:
            await conn.execute(f"UPDATE {self.s}.issuances SET last_error = %s, updated_at = now() WHERE id = %s",
                               (error, issuance_id))

    async def confirm(self, issuance_id: int, polar_ref: str) -> None:
        async with self.db.pool.connection() as conn:
            await conn.execute(f"UPDATE {self.s}.issuances SET state = 'confirmed', polar_ref = %s, updated_at = now()"
                               " WHERE id = %s", (polar_ref, issuance_id))

    async def fail(self, issuance_id: int, error: str) -> None:
        async with self.db.pool.connection() as conn:
            await conn.execute(f"UPDATE {self.s}.issuances SET state = 'failed', last_error = %s, updated_at = now()"
                               " WHERE id = %s AND state = 'intent'", (error, issuance_id))
