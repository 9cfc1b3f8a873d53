"""The watchlist: /billing-watch add|remove|list (the listener, called as Bolt calls it), and the
morning reconciliation message, which lists watched customers' anomalies first, even the small
ones a kind's three worst would leave out."""
import asyncio
import subprocess
import sys
from datetime import date
from types import SimpleNamespace
from unittest.mock import AsyncMock

import pytest

from bot.commands.billing_watch import billing_watch
from bot.context import Metrics
from bot.reconcile_post import reconciliation_blocks
from services.db import Database
from services.reconcile import Anomaly, Reconciliation
from services.store import Watchlist

from .fakes.slack_server import BOT_TOKEN, FakeSlack
from .test_reconcile import seed_all_kinds


def anomaly(kind, customer, cents, instance="i-x"):
    return Anomaly(kind, instance, "o-1", customer, [1], cents, f"{kind} of {customer}")


def texts(msg):
    return [b["text"]["text"] for b in msg["blocks"] if b["type"] == "section"]


def test_watched_customers_come_first_even_below_the_worst_three():
    rec = Reconciliation(date(2026, 10, 5), [
        anomaly("duplicate", "c-big1", 900), anomaly("duplicate", "c-big2", 800), anomaly("duplicate", "c-big3", 700),
        anomaly("duplicate", "c-small", 3, "i-s"), anomaly("charge_mismatch", "c-small", 0, "i-s2"),
        anomaly("duplicate", "c-big4", 600)])
    plain = texts(reconciliation_blocks(rec, {}))
    # below its kind's worst three: not shown without the watchlist
    assert not any("duplicate of c-small" in t for t in plain)
    watched = texts(reconciliation_blocks(rec, {}, {"c-small"}))
    assert watched[1].startswith("*Watchlist*: 2 anomalies of 1 watched customer(s)")
    assert watched[2] == "• duplicate: i-s (c-small): $0.03 — duplicate of c-small"
    assert watched[3] == "• charge_mismatch: i-s2 (c-small): $0.00 — charge_mismatch of c-small"
    assert watched[4] == "*charge_mismatch*: 1 · $0.00"  # its one anomaly is c-small's, listed above
    assert watched[5].startswith("*duplicate*: 5")
    assert [t for t in watched[6:9]] == [f"• i-x (c-big{n}): ${n2}.00 — duplicate of c-big{n}"
                                         for n, n2 in ((1, 9), (2, 8), (3, 7))]
    assert sum("c-small" in t for t in watched) == 2  # listed once, first
    # every watched anomaly keeps its Open case button
    msg = reconciliation_blocks(rec, {}, {"c-small"})
    assert msg["blocks"][3]["accessory"]["value"] == "i-s 2026-10"


def test_nothing_watched_changes_nothing():
    rec = Reconciliation(date(2026, 10, 5), [anomaly("duplicate", "c-1", 5)])
    assert reconciliation_blocks(rec, {}, {"c-9"}) == reconciliation_blocks(rec, {})


@pytest.fixture
def slack():
    fake = FakeSlack().start()
    yield fake
    fake.stop()


def test_the_posted_morning_message_lists_the_watchlist_first(db, db_url, slack, tmp_path):
    seed_all_kinds(db)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("channels: {alerts: C_ALERTS}\n")
    env = {"DATABASE_URL": db_url, "SLACK_BOT_TOKEN": BOT_TOKEN, "SLACK_API_URL": slack.api_url,
           "BILLING_BOT_CONFIG": str(cfg), "PATH": "/usr/bin:/bin"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "bot.cli", *a], env=env, capture_output=True,  # noqa: E731
                                    text=True, timeout=120)
    assert run("watch", "add", "c-i", "idle reaper incident").returncode == 0
    proc = run("reconcile", "--date", "2026-10-05", "--post")
    assert proc.returncode == 0, proc.stderr
    (posted,) = slack.of("chat.postMessage")
    sections = texts(posted)
    assert sections[1].startswith("*Watchlist*: 1 anomaly of 1 watched customer(s)")
    assert sections[2].startswith("• billed_while_idle: i-idle (c-i):")
    assert not any(s.startswith("• i-idle") for s in sections[3:])  # not repeated under its kind


def run_command(db_url, text, user="U_AGENT"):
    async def go():
        dbx = await Database.connect(db_url)
        try:
            ctx = SimpleNamespace(metrics=Metrics(), cases=SimpleNamespace(store=SimpleNamespace(db=dbx)))
            ack = AsyncMock()
            await billing_watch(ack, {"text": text, "user_id": user, "channel_id": "C1"}, AsyncMock(), {"bot": ctx})
            rows = await Watchlist(dbx).list()
            return ack, rows
        finally:
            await dbx.close()
    return asyncio.run(go())


def answer(ack):
    ack.assert_awaited_once()
    kwargs = ack.await_args.kwargs
    assert kwargs["response_type"] == "ephemeral"
    return kwargs["text"]


def test_billing_watch_add_list_remove(db, db_url):
    ack, rows = run_command(db_url, "add c-acme throttle failed <!channel> & co")
    assert answer(ack) == ("\N{EYES} c-acme is now on the watchlist: throttle failed &lt;!channel&gt; &amp; co. "
                           "Its anomalies come first in the morning reconciliation.".replace("\N{EYES}", ":eyes:"))
    assert [(r["customer_id"], r["reason"], r["added_by"]) for r in rows] == [
        ("c-acme", "throttle failed <!channel> & co", "U_AGENT")]
    ack, rows = run_command(db_url, "add c-acme another reason", user="U_OTHER")
    assert answer(ack) == "c-acme is already on the watchlist." and rows[0]["added_by"] == "U_AGENT"
    ack, _ = run_command(db_url, "list")
    listed = answer(ack)
    assert listed.startswith("*Watchlist* (1):\n• c-acme — since ") and "&lt;!channel&gt;" in listed
    assert "<!channel>" not in listed
    ack, rows = run_command(db_url, "remove c-acme")
    assert answer(ack) == "c-acme is off the watchlist." and rows == []
    ack, _ = run_command(db_url, "remove c-acme")
    assert answer(ack) == "c-acme was not on the watchlist."
    ack, _ = run_command(db_url, "list")
    assert answer(ack) == "The watchlist is empty."


@pytest.mark.parametrize("text, words", [
    ("", "usage: /billing-watch"), ("watch c-1", "usage: /billing-watch"), ("add", "the customer id is missing"),
    ("add <@U123>", "invalid customer id"), ("remove c-1 because", "remove takes only the customer id"),
    ("list c-1", "list takes no customer id"), ("add c-1 " + "x" * 301, "longer than 300"),
])
def test_billing_watch_bad_input_changes_nothing(db, db_url, text, words):
    ack, rows = run_command(db_url, text)
    said = answer(ack)
    assert said.startswith(":warning: ") and words in said and "<@" not in said
    assert rows == []
