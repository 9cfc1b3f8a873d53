"""An embedded PostgreSQL (pgserver) for a machine with no DATABASE_URL: the demo's database.

The server's data folder is BILLING_BOT_DATA (default ./.billing-bot/pgdata). It holds the
control-plane schema and the demo month (services/demo_data.py), which is always last month: a
folder seeded in an earlier month is wiped and seeded again, so the demo's stories (and the
README's example) hold on any day.

pgserver is an optional dependency (the `demo` and `test` extras): the production image does not
carry a PostgreSQL server, and this module imports it only when the demo database is started.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

import psycopg

from services.config import ConfigError, Env

SQL_DIR = Path(__file__).parent / "sql"
DEFAULT_DATA = ".billing-bot/pgdata"
_SEED_LOCK = 0x6269_6c6c_6465_6d6f  # pg_advisory_xact_lock key ("billdemo"): one seeding at a time

log = logging.getLogger(__name__)


class EmbeddedUnavailable(ConfigError):
    """pgserver is not installed (the production image): the demo database cannot run here."""


@dataclass
class Embedded:
    server: object
    url: str
    folder: Path
    month: date

    def stop(self) -> None:
        """Stop PostgreSQL unless another live process still uses it (pgserver counts handles).

        pgserver keeps the pids of its users in the data folder and stops the server when the
        last one leaves; a process that was killed never leaves, and then no later process would
        stop the server. The pids of processes that no longer exist are dropped first."""
        server = self.server
        try:
            import psutil

            plist = getattr(server, "global_process_id_list", None)
            lock = getattr(server, "_lock", None)
            if plist is not None and lock is not None:
                with lock:
                    pids = plist.get()
                    alive = [p for p in pids if p == os.getpid() or psutil.pid_exists(p)]
                    if alive != pids:
                        plist.put(alive)
        except Exception:  # pruning is a courtesy; pgserver's own clean-up still runs below
            log.debug("could not prune pgserver handles", exc_info=True)
        server.cleanup()


def controlplane_ddl() -> str:
    return (SQL_DIR / "controlplane.sql").read_text()


def data_folder(data_dir: str | None = None) -> Path:
    return Path(data_dir or os.environ.get("BILLING_BOT_DATA") or DEFAULT_DATA).resolve()


def _import_pgserver():
    import warnings

    try:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset; harmless here
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError:
        raise EmbeddedUnavailable(
            "DATABASE_URL is not set, and the embedded demo database is not installed here "
            "(pip install 'billing-bot[demo]'); set DATABASE_URL to the control-plane database") from None
    return pgserver


def start_embedded(data_dir: str | None = None, seed: bool = True, now: datetime | None = None) -> Embedded:
    pgserver = _import_pgserver()
    from services.demo_data import demo_month

    folder = data_folder(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(str(folder), cleanup_mode="stop")
    url = server.get_uri()
    month = demo_month(now).date()
    if seed:
        with psycopg.connect(url, autocommit=True) as conn:
            ensure_demo_month(conn, month, now)
    return Embedded(server, url, folder, month)


def ensure_demo_month(conn: psycopg.Connection, month: date, now: datetime | None = None) -> bool:
    """Seed the demo month unless this database already holds it; True when it (re)seeded.

    A stale database (an earlier month, or a folder from before the month was recorded) is
    emptied first, the bot's own schema included: its cases point at the old records."""
    from services.demo_data import seed_demo

    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SEED_LOCK,))
        has_mark = conn.execute("SELECT to_regclass('public.demo_seed') IS NOT NULL").fetchone()[0]
        if has_mark:
            row = conn.execute("SELECT month FROM public.demo_seed").fetchone()
            if row is not None and row[0] == month:
                return False
        schemas = [r[0] for r in conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'")]
        for name in schemas:  # everything in this folder is the demo's own
            conn.execute(f'DROP SCHEMA "{name}" CASCADE')
        conn.execute("CREATE SCHEMA public")
        conn.execute(controlplane_ddl())
        seed_demo(conn, now)
        conn.execute("CREATE TABLE public.demo_seed (month date NOT NULL)")
        conn.execute("INSERT INTO public.demo_seed VALUES (%s)", (month,))
    log.info("seeded the demo month %s in %s", month.strftime("%Y-%m"), conn.info.dbname)
    return True


# The embedded servers this process started: stopped by stop_embedded() when the command ends
# (bot/cli.py main), so no PostgreSQL is left running behind a finished command.
_STARTED: list = []


def database_url(env: Env) -> tuple[str, object | None]:
    """DATABASE_URL (validated), else an embedded PostgreSQL seeded with the demo month."""
    if env.database_url:
        from services.db import validate_database_url

        return validate_database_url(env.database_url), None
    from services.embedded import start_embedded

    server = start_embedded()
    if not any(s is server or s.folder == server.folder for s in _STARTED):
        _STARTED.append(server)
    return server.url, server


def stop_embedded() -> None:
    """Stop the embedded PostgreSQL this process started, if any (idempotent)."""
    while _STARTED:
        server = _STARTED.pop()
        try:
            server.stop()
        except Exception:  # stopping is best effort at exit; the next start copes with a running server
            log.warning("could not stop the embedded PostgreSQL in %s", server.folder, exc_info=True)
