"""Helpers for the benchmarks: a throwaway PostgreSQL with the control-plane schema, bulk COPY."""
from __future__ import annotations

import tempfile

import psycopg

from services.embedded import controlplane_ddl


def fresh_database():
    """(server, url): a new pgserver in a temp folder with the control-plane schema."""
    import pgserver

    folder = tempfile.mkdtemp(prefix="billing-bench-")
    server = pgserver.get_server(folder, cleanup_mode="delete")
    url = server.get_uri()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(controlplane_ddl())
    return server, url


def copy_records(conn, rows):
    """rows: (id, customer, org, instance, tier, rate, hours, total, period, start, end)."""
    with conn.cursor() as cur:
        with cur.copy("COPY billing_records (id, customer_id, org_id, instance_id, tier, rate_per_hour, hours_used,"
                      " total_charge, billing_period, start_time, end_time, created_at) FROM STDIN") as copy:
            for r in rows:
                copy.write_row((*r, r[-1]))
