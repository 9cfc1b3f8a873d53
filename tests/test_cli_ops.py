"""The CLI as an operator meets it, run as a process: the demo database only when meant (and said),
one line within seconds when the database cannot be used, never a password, no library noise,
--help that documents the environment and the exit codes."""
from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import pytest

from .seed import instance

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "Sup3r-s3cret-pw"


def run(args, env, timeout=60):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bot.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    proc.took = time.monotonic() - t0
    return proc


def bare_env(**extra) -> dict:
    """Only what a shell would have, plus the given variables: no DATABASE_URL unless given."""
    env = {k: v for k, v in os.environ.items()
           if k in ("PATH", "HOME", "LANG", "XDG_RUNTIME_DIR", "PYTHONPATH", "TMPDIR")}
    env.update(extra)
    return env


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


# --- the demo database only when meant ---------------------------------------------------------------

@pytest.fixture
def demo_env(tmp_path):
    return bare_env(BILLING_BOT_DATA=str(tmp_path / "pgdata"))


def postmaster_running(data: Path) -> bool:
    import psutil
    pid_file = data / "postmaster.pid"
    if not pid_file.exists():
        return False
    try:
        return psutil.Process(int(pid_file.read_text().split()[0])).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_readme_example_runs_as_written_on_the_demo_database(demo_env):
    readme = (ROOT / "README.md").read_text()
    example = readme.split("Example (SPEC 2.3", 1)[1].split("```", 2)[1]
    command = next(line[2:] for line in example.splitlines() if line.startswith("$ "))
    argv = shlex.split(command)
    assert argv[0] == ".venv/bin/billing-bot"
    proc = run(argv[1:], demo_env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # the DEMO DATABASE line is on stderr: stdout stays JSON
    assert one_line(proc.stderr).startswith("DEMO DATABASE: DATABASE_URL is not set")
    assert out["credit_cents"] == 1028 and out["required_level"] == 1
    shown = re.findall(r'"kind": "(\w+)", "credit_cents": (\d+)', example)
    assert [(f["kind"], f["credit_cents"]) for f in out["findings"]] == [(k, int(c)) for k, c in shown]
    assert out["sources"] == json.loads(re.search(r'"sources": (\{.*?\})', example, re.S).group(1))
    shown_coverage = re.search(r'"coverage": \{"state": "(\w+)", "kinds": (\[.*?\])', example)
    assert out["coverage"]["state"] == shown_coverage.group(1) == "partial"  # no cluster, no Polar in the demo
    assert out["coverage"]["kinds"] == json.loads(shown_coverage.group(2))
    now = datetime.now(timezone.utc)
    last = (now.replace(day=1) - __import__("datetime").timedelta(days=1)).strftime("%Y-%m")
    assert out["periods"] == [last, now.strftime("%Y-%m")]


@pytest.fixture(scope="module")
def shared_demo_env(tmp_path_factory):
    """One demo folder for the output tests below: initialised and seeded once, started per command."""
    return bare_env(BILLING_BOT_DATA=str(tmp_path_factory.mktemp("shared-demo") / "pgdata"))


@pytest.mark.parametrize("args", [["check", "i-7f3a"], ["reconcile"], ["report", "--since", "2026-01-01"], ["demo"]])
def test_every_text_output_starts_with_the_demo_line_and_postgres_stops_after(shared_demo_env, args):
    proc = run(args, shared_demo_env)
    assert proc.returncode == 0, (args, proc.stderr)
    assert proc.stdout.splitlines()[0].startswith("DEMO DATABASE: "), (args, proc.stdout[:300])
    assert proc.stdout.count("DEMO DATABASE") == 1 and proc.stderr == ""
    assert not postmaster_running(Path(shared_demo_env["BILLING_BOT_DATA"])), f"{args} left PostgreSQL running"


@pytest.mark.parametrize("args", [["check", "i-7f3a", "--json"], ["reconcile", "--json"],
                                  ["report", "--since", "2026-01-01", "--csv"]])
def test_machine_output_keeps_stdout_clean_and_says_demo_on_stderr(shared_demo_env, args):
    proc = run(args, shared_demo_env)
    assert proc.returncode == 0 and "DEMO DATABASE" not in proc.stdout, args
    assert one_line(proc.stderr).startswith("DEMO DATABASE: ")
    if "--json" in args:
        json.loads(proc.stdout)
    else:
        assert proc.stdout.splitlines()[0].startswith("id,resolved_at,")  # the CSV header, first
    assert not postmaster_running(Path(shared_demo_env["BILLING_BOT_DATA"]))


def test_a_killed_user_of_the_demo_database_does_not_keep_it_running(demo_env):
    """pgserver stops the server when its last user leaves; a killed process never leaves."""
    data = Path(demo_env["BILLING_BOT_DATA"])
    assert run(["check", "i-7f3a"], demo_env).returncode == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (data / ".handle_pids.json").write_text(json.dumps([dead.pid]))
    assert run(["check", "i-7f3a"], demo_env).returncode == 0
    assert not postmaster_running(data)


@pytest.mark.parametrize("args,words", [
    (["serve"], "serve: DATABASE_URL is not set; refusing to answer Slack from the embedded demo database"),
    (["reconcile", "--post"], "reconcile --post: DATABASE_URL is not set; refusing to post"),
])
def test_serve_and_reconcile_post_refuse_the_demo_database_unless_asked(demo_env, args, words):
    env = dict(demo_env, SLACK_BOT_TOKEN="xoxb-x", SLACK_SIGNING_SECRET="s")
    proc = run(args, env)
    assert proc.returncode == 2 and proc.stdout == ""
    line = one_line(proc.stderr)
    assert line.startswith("billing-bot: " + words) and line.endswith("(pass --demo to do that on purpose)")
    assert not (Path(demo_env["BILLING_BOT_DATA"]) / "PG_VERSION").exists()  # refused before starting anything


def test_a_stale_demo_month_is_seeded_again(db_url):
    from services.demo_data import demo_month
    from services.embedded import ensure_demo_month

    old = datetime(2026, 3, 15, tzinfo=timezone.utc)
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert ensure_demo_month(conn, demo_month(old).date(), old) is True
        conn.execute("CREATE SCHEMA billing_bot; CREATE TABLE billing_bot.cases (id int)")  # a case of February
        assert conn.execute("SELECT DISTINCT billing_period FROM billing_records").fetchall() == [("2026-02",)]
        assert ensure_demo_month(conn, demo_month(old).date(), old) is False  # same month: left alone
        this = demo_month()
        assert ensure_demo_month(conn, this.date()) is True
        assert conn.execute("SELECT DISTINCT billing_period FROM billing_records").fetchall() == \
            [(this.strftime("%Y-%m"),)]
        assert conn.execute("SELECT to_regclass('billing_bot.cases')").fetchone()[0] is None
        assert conn.execute("SELECT count(*) FROM instances WHERE instance_id = 'i-7f3a'").fetchone()[0] == 1


# --- failure output -------------------------------------------------------------------------------

def test_unreachable_database_one_line_fast_no_password(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://bot:{PASSWORD}@127.0.0.1:{port}/cp"
    for args in (["check", "i-7f3a"], ["reconcile", "--json"], ["report", "--since", "2026-01-01"]):
        proc = run(args, bare_env(DATABASE_URL=url))
        assert proc.returncode == 1 and proc.stdout == "", args
        line = one_line(proc.stderr)
        assert line.startswith(f"billing-bot: cannot connect to the database at postgresql://bot:***@127.0.0.1:{port}/cp"
                               " (DATABASE_URL): ") and "Connection refused" in line, line
        assert PASSWORD not in proc.stderr and proc.took < 5, (args, proc.took)


def test_a_database_that_never_answers_gives_up_within_the_connect_timeout():
    with socket.socket() as s:  # accepts the TCP connection (backlog), never speaks PostgreSQL
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        url = f"postgresql://bot:{PASSWORD}@127.0.0.1:{s.getsockname()[1]}/cp"
        proc = run(["check", "i-7f3a"], bare_env(DATABASE_URL=url))
    assert proc.returncode == 1
    line = one_line(proc.stderr)
    assert "cannot connect to the database at postgresql://bot:***@" in line and "timeout" in line, line
    assert PASSWORD not in proc.stderr and proc.took < 8, proc.took  # connect_timeout 5 s, plus start-up


@pytest.mark.parametrize("url,why", [
    (f"bot:{PASSWORD}@db.internal:5432/cp", "(no scheme)"),
    (f"mysql://bot:{PASSWORD}@db.internal/cp", "(scheme 'mysql')"),
    (f"host=db.internal password={PASSWORD}", "(no scheme)"),
])
def test_a_malformed_database_url_is_exit_2_redacted(url, why):
    proc = run(["check", "i-7f3a"], bare_env(DATABASE_URL=url))
    assert proc.returncode == 2 and proc.stdout == ""
    line = one_line(proc.stderr)
    assert line.startswith("billing-bot: DATABASE_URL: expected postgresql://user:password@host:5432/dbname, got ")
    assert line.endswith(why) and "***" in line and PASSWORD not in line


def test_unreachable_kubernetes_prints_no_retry_warnings(db, bot_env, tmp_path):
    instance(db, "i-7f3a", tier="gpu", heartbeat="2026-10-05 09:00")
    kubeconfig = tmp_path / "dead-kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:9\n"
        "users:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n"
        "current-context: c\n")
    proc = run(["check", "i-7f3a", "--period", "2026-10", "--json"], dict(bot_env, KUBECONFIG=str(kubeconfig)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no urllib3 "Retrying (Retry(total=...))" lines, no psycopg warnings
    assert json.loads(proc.stdout)["sources"]["kubernetes"].startswith("failed: ")


# --- help ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("sub", [[], ["check"], ["serve"], ["reconcile"], ["report"], ["demo"]])
def test_help_documents_environment_demo_fallback_and_exit_codes(sub):
    proc = run([*sub, "--help"], bare_env())
    assert proc.returncode == 0
    for words in ("DATABASE_URL", "embedded demo database", "DEMO DATABASE", "SLACK_BOT_TOKEN", "POLAR_API_KEY",
                  "KUBECONFIG", "BILLING_BOT_CONFIG", "LOG_FORMAT", "exit codes:", "  1  the database could not",
                  "  2  bad input or configuration"):
        assert words in proc.stdout, (sub, words)
