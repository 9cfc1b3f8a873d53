"""Helpers for the benchmarks: a throwaway PostgreSQL with the control-plane schema, bulk COPY."""
from __future__ import annotations

import tempfile

import psycopg

from services.embedded import controlplane_ddl


def fresh_database(folder: str | None = None):
    """(server, url): a pgserver with the control-plane schema, in a temp folder (deleted at exit)
    or in the given folder (kept, so a large data set is generated once)."""
    import warnings

    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset; harmless here
        warnings.simplefilter("ignore")
        import pgserver

    keep = folder is not None
    folder = folder or tempfile.mkdtemp(prefix="billing-bench-")
    server = pgserver.get_server(folder, cleanup_mode="stop" if keep else "delete")
    url = server.get_uri()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(controlplane_ddl())
    return server, url


# the COPY of billing records; created_at is the end of the billed hour
COPY_RECORDS = ("COPY billing_records (id, customer_id, org_id, instance_id, tier, rate_per_hour, hours_used,"
                " total_charge, billing_period, start_time, end_time, created_at) FROM STDIN")


def copy_records(conn, rows):
    """rows: (id, customer, org, instance, tier, rate, hours, total, period, start, end)."""
    with conn.cursor() as cur:
        with cur.copy(COPY_RECORDS) as copy:
            for r in rows:
                copy.write_row((*r, r[-1]))


def seed_duplicate_hours(url: str, runs: int, name: str) -> None:
    """For the soaks: run i's instance i-<name>NNNN of customer c-<name>NNNN, running, with one
    October hour billed twice ($2.08 to credit)."""
    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(runs):
            iid, cust = f"i-{name}{i:04d}", f"c-{name}{i:04d}"
            conn.execute("INSERT INTO instances VALUES (%s,%s,%s,'gpu','running','2026-09-01Z','2026-09-01Z',"
                         "NULL,'2026-12-01Z')", (iid, f"o-{name}", cust))
            for rid in (2 * i + 1, 2 * i + 2):
                conn.execute("INSERT INTO billing_records (id, customer_id, org_id, instance_id, tier, rate_per_hour,"
                             " hours_used, total_charge, billing_period, start_time, end_time) VALUES"
                             " (%s,%s,%s,%s,'gpu',2.08,1,2.08,'2026-10','2026-10-05 08:00Z','2026-10-05 09:00Z')",
                             (rid, cust, f"o-{name}", iid))


class Quiet:
    """No Slack and no SMTP: the notifier costs nothing in a bench (production's tells Slack and
    sends the letter)."""

    async def issued(self, case, refs, remainder):
        pass

    async def failed(self, case, reason, offer):
        pass

    async def rechecked(self, outcome):
        pass

    async def pending(self, case, refs):
        pass

    async def outside(self, case, amount, reason):
        pass

    async def reverted(self, case, refund_id, amount, status):
        pass

    async def remainder_offered(self, parent, child):
        pass
