"""The lifecycle held by the database and by the served bot: every move the table does not list is
refused by the store's trigger too, whoever writes the row; the Adjust authority rule end to end."""
import asyncio
import json

import psycopg
import pytest

from handlers.cases import STATES, allowed_moves
from services.db import Database
from services.store import CaseStore

from .seed import instance, record
from .slack_harness import Bot, wait_for
from .test_slack_e2e import GROUPS, case_row, events, open_case, seed_cases  # noqa: F401  (fixture helpers)
from .fakes.slack_server import FakeSlack


def migrated(db_url):
    async def go():
        db = await Database.connect(db_url)
        try:
            await CaseStore(db).migrate()
        finally:
            await db.close()
    asyncio.run(go())


def insert_case(conn, state: str) -> int:
    return conn.execute(
        "INSERT INTO billing_bot.cases (instance_id, org_id, customer_id, periods, state, proposed_cents, credit_cents,"
        " required_level, report, requested_by) VALUES ('i-x','o','c','{2026-10}',%s,100,100,1,'{}','U') RETURNING id",
        (state,)).fetchone()[0]


def test_the_database_refuses_every_move_the_table_does_not_list(db_url):
    migrated(db_url)
    legal = {(a, b) for a, b in allowed_moves() if a != b}  # a move within a state (Adjust) changes no state
    refused = allowed = 0
    with psycopg.connect(db_url, autocommit=True) as conn:
        for source in STATES:
            for target in STATES:
                if source == target:
                    continue
                case_id = insert_case(conn, source)
                if (source, target) in legal:
                    conn.execute("UPDATE billing_bot.cases SET state = %s WHERE id = %s", (target, case_id))
                    allowed += 1
                else:
                    with pytest.raises(psycopg.errors.CheckViolation, match="illegal case transition"):
                        conn.execute("UPDATE billing_bot.cases SET state = %s WHERE id = %s", (target, case_id))
                    refused += 1
        assert allowed == len(legal) and refused == len(STATES) * (len(STATES) - 1) - len(legal)
        # the trigger's table is the code's table, rewritten at every start
        rows = set(conn.execute("SELECT from_state, to_state FROM billing_bot.case_transitions").fetchall())
        assert rows == allowed_moves()


def test_the_store_moves_only_from_the_actions_sources(db_url):
    migrated(db_url)
    with psycopg.connect(db_url, autocommit=True) as conn:
        case_id = insert_case(conn, "issued")

    async def go():
        db = await Database.connect(db_url)
        try:
            store = CaseStore(db)
            gone = await store.move(case_id, "retry", "U_LEAD")
            return gone, await store.get(case_id), await store.events(case_id)
        finally:
            await db.close()
    gone, case, evs = asyncio.run(go())
    assert gone is None and case.state == "issued" and evs == []


@pytest.fixture
def slack():
    fake = FakeSlack(GROUPS).start()
    yield fake
    fake.stop()


def test_an_agent_cannot_adjust_a_lead_case_and_is_told_who_can(db, db_url, slack, tmp_path):
    seed_cases(db)
    bot = Bot(db_url, slack, tmp_path)
    try:
        case_id, upd = open_case(bot, slack, "i-stuck 2026-10", user="U_LEAD")
        assert case_row(db_url, case_id)[2:4] == (9984, 2)
        r = bot.submit_view("case_adjust_modal", {"amount": "0.01"}, "U_AGENT", str(case_id))
        error = r.json()["errors"]["amount"]
        assert "authority over $99.84" in error and "Level 2 (Support lead) can decide" in error
        assert case_row(db_url, case_id)[2:4] == (9984, 2), "the amount is unchanged"
        wait_for(lambda: "refused" in events(db_url, case_id), what="refusal audited")
        # nor reject it
        r = bot.submit_view("case_reject_modal", {"reason": "not our fault"}, "U_AGENT", str(case_id))
        assert "Level 2 (Support lead) can decide" in r.json()["errors"]["reason"]
        assert case_row(db_url, case_id)[0] == "pending"
        # the lead can
        r = bot.submit_view("case_adjust_modal", {"amount": "40.00"}, "U_LEAD", str(case_id))
        assert r.status_code == 200 and r.text == ""
        assert case_row(db_url, case_id)[2:4] == (4000, 1)
    finally:
        bot.stop()
