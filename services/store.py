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

    async def record_reconciliation(self, rec) -> int:
        """Store a run's totals and, per finding kind, how many customers it touched (SPEC 2.4)."""
        await self.migrate()
        period = rec.day.strftime("%Y-%m")
        async with self.db.pool.connection() as conn:
            async with conn.transaction():
                cur = await conn.execute(
                    f"INSERT INTO {self.s}.reconcile_runs (day, totals) VALUES (%s, %s) RETURNING id",
                    (rec.day, json.dumps(rec.totals())))
                run_id = (await cur.fetchone())["id"]
                for kind, customers in rec.customers_by_finding_kind().items():
                    await conn.execute(
                        f"INSERT INTO {self.s}.reconcile_kind_customers VALUES (%s, %s, %s, %s)",
                        (run_id, period, kind, len(customers)))
        return run_id
