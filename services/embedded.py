"""An embedded PostgreSQL (pgserver) for a machine with no DATABASE_URL: the demo's database.

The server's data folder is BILLING_BOT_DATA (default ./.billing-bot/pgdata). On first start it
gets the control-plane schema and the demo month (services/demo_data.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import psycopg

SQL_DIR = Path(__file__).parent / "sql"


@dataclass
class Embedded:
    server: object
    url: str


def controlplane_ddl() -> str:
    return (SQL_DIR / "controlplane.sql").read_text()


def start_embedded(data_dir: str | None = None, seed: bool = True) -> Embedded:
    import warnings

    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset; harmless here
        warnings.simplefilter("ignore")
        import pgserver

    folder = Path(data_dir or os.environ.get("BILLING_BOT_DATA") or ".billing-bot/pgdata").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(str(folder), cleanup_mode="stop")
    url = server.get_uri()
    if seed:
        with psycopg.connect(url, autocommit=True) as conn:
            exists = conn.execute("SELECT to_regclass('public.instances') IS NOT NULL").fetchone()[0]
            if not exists:
                from services.demo_data import seed_demo

                conn.execute(controlplane_ddl())
                seed_demo(conn)
    return Embedded(server, url)
