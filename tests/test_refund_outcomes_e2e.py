"""Issue 13 over the served bot: a refund is money moved only when Polar says succeeded. Polar's
webhooks arrive signed as Polar signs them; without a secret, the sweeper reads the outcome back."""
import json
import time
from datetime import datetime, timezone

import psycopg
import pytest

from .fakes.polar_server import TOKEN, WEBHOOK_SECRET
from .fakes.slack_server import FakeSlack
from .slack_harness import Bot, wait_for
from .test_slack_e2e import GROUPS, case_row, events, open_case, seed_cases


@pytest.fixture
def slack():
    fake = FakeSlack(GROUPS).start()
    yield fake
    fake.stop()


def corrections(db_url):
    with psycopg.connect(db_url) as conn:
        return conn.execute("SELECT credit_amount::text FROM billing_corrections").fetchall()


def start(db, db_url, slack, polar, smtp, tmp_path, secret=True):
    seed_cases(db)
    polar.add_customer("c-acme", email="ada@example.com", name="Ada Lovelace")
    polar.add_order("c-acme", datetime(2026, 11, 1, 0, 5, tzinfo=timezone.utc), 5000)
    env = {"POLAR_API_URL": polar.url, "POLAR_API_KEY": TOKEN, "SMTP_URL": smtp.url,
           "BILLING_BOT_SWEEP_S": "0.5", "BILLING_BOT_SWEEP_AGE_S": "1"}
    if secret:
        env["POLAR_WEBHOOK_SECRET"] = WEBHOOK_SECRET
    bot = Bot(db_url, slack, tmp_path, extra_env=env)
    polar.webhook_endpoint(bot.url + "/polar/webhooks", WEBHOOK_SECRET)
    return bot


def approved_and_pending(bot, slack):
    """Open the worked example's case, approve it, and wait for Polar's refund to be pending."""
    case_id, _ = open_case(bot, slack, "i-7f3a 2026-10")
    bot.action("case_approve", case_id, "U_AGENT2")
    wait_for(lambda: any("Refund pending in Polar" in t for t in thread_texts(slack)), what="refund pending")
    return case_id


def thread_texts(slack):
    return [m.get("text") or "" for m in slack.of("chat.postMessage") if m.get("thread_ts")]


def test_pending_then_succeeded_tells_the_customer_once_after_the_success(db, db_url, slack, polar, smtp, tmp_path):
    polar.next_refund_status = "pending"
    bot = start(db, db_url, slack, polar, smtp, tmp_path)
    try:
        case_id = approved_and_pending(bot, slack)
        polar.deliver()  # refund.created (pending): nothing changes
        time.sleep(1.5)
        assert case_row(db_url, case_id)[0] == "issuing"
        assert corrections(db_url) == [] and smtp.messages == []
        polar.settle_refund(polar.refunds[0]["id"], "succeeded")
        assert all(d.status == 200 for d in polar.deliver())
        wait_for(lambda: case_row(db_url, case_id)[0] == "issued", what="issued after Polar's success")
        wait_for(lambda: smtp.messages, what="email")
        assert corrections(db_url) == [("10.28",)]
        time.sleep(1.0)
        assert len(smtp.messages) == 1 and len(polar.refunds) == 1
        # a repeated delivery changes nothing
        again = polar.send(polar.messages("refund.updated")[0])
        assert again.status == 200 and "duplicate" in again.body
        assert corrections(db_url) == [("10.28",)]
    finally:
        bot.stop()


def test_pending_then_failed_tells_nobody_of_money_then_invoice_credit_once(db, db_url, slack, polar, smtp, tmp_path):
    polar.next_refund_status = "pending"
    bot = start(db, db_url, slack, polar, smtp, tmp_path)
    try:
        case_id = approved_and_pending(bot, slack)
        polar.settle_refund(polar.refunds[0]["id"], "failed")
        polar.deliver()
        wait_for(lambda: case_row(db_url, case_id)[0] == "failed", what="failed with Polar's word")
        failure = wait_for(lambda: [m for m in slack.of("chat.postMessage") if m.get("thread_ts")
                                    and "failed" in (m.get("text") or "") and m.get("blocks")], what="failure told")[0]
        assert "as failed: no money moved" in failure["text"]
        buttons = {e["action_id"]: e["value"] for e in failure["blocks"][1]["elements"]}
        assert set(buttons) == {"case_retry", "case_invoice_credit"}
        assert corrections(db_url) == [] and smtp.messages == []
        assert any(m["channel"] == "U_AGENT2" and "failed" in m["text"] for m in slack.of("chat.postMessage"))
        # the unpaid part as invoice credit: issued once
        bot.post({"payload": json.dumps({
            "type": "block_actions", "user": {"id": "U_AGENT2"}, "team": {"id": "T1"}, "api_app_id": "A1",
            "trigger_id": "t", "channel": {"id": "C_SUPPORT"}, "container": {"type": "message"},
            "actions": [{"action_id": "case_invoice_credit", "block_id": "b", "value": buttons["case_invoice_credit"],
                         "type": "button"}]})})
        wait_for(lambda: case_row(db_url, case_id)[0] == "issued", what="issued as invoice credit")
        wait_for(lambda: smtp.messages, what="email")
        assert corrections(db_url) == [("10.28",)]
        assert "next invoice" in smtp.messages[0][1]
        time.sleep(1.0)
        assert len(smtp.messages) == 1
        # the old failure's button is no longer current
        before = len(slack.of("chat.postEphemeral"))
        bot.action("case_retry", case_id, "U_AGENT2")
        msg = wait_for(lambda: slack.of("chat.postEphemeral")[before:], what="answer")[0]
        assert "already decided" in msg["text"] or "no longer current" in msg["text"]
        assert corrections(db_url) == [("10.28",)]
    finally:
        bot.stop()


def test_without_a_webhook_secret_polling_finds_the_outcome(db, db_url, slack, polar, smtp, tmp_path):
    polar.next_refund_status = "pending"
    bot = start(db, db_url, slack, polar, smtp, tmp_path, secret=False)
    try:
        case_id = approved_and_pending(bot, slack)
        assert polar.send(polar.messages("refund.created")[0]).status == 401  # unverifiable: refused
        polar.settle_refund(polar.refunds[0]["id"], "succeeded")  # nobody tells the bot
        wait_for(lambda: case_row(db_url, case_id)[0] == "issued", timeout=20, what="issued by polling")
        wait_for(lambda: smtp.messages, what="email")
        assert corrections(db_url) == [("10.28",)]
    finally:
        bot.stop()


def test_a_refund_polar_made_outside_the_bot_is_noted_on_the_case(db, db_url, slack, polar, smtp, tmp_path):
    bot = start(db, db_url, slack, polar, smtp, tmp_path)
    try:
        case_id, _ = open_case(bot, slack, "i-7f3a 2026-10")
        bot.action("case_approve", case_id, "U_AGENT2")
        wait_for(lambda: case_row(db_url, case_id)[0] == "issued", what="issued")
        polar.refund_outside(polar.refunds[0]["order_id"], amount=500)
        polar.deliver()
        wait_for(lambda: any("Polar refunded $5.00 on this order outside the bot" in t for t in thread_texts(slack)),
                 what="thread note")
        wait_for(lambda: "refund_outside_bot" in events(db_url, case_id), what="audit event")
        assert events(db_url, case_id).count("refund_outside_bot") == 1
    finally:
        bot.stop()


def test_forged_old_and_unsigned_deliveries_get_401_and_change_nothing(db, db_url, slack, polar, smtp, tmp_path):
    polar.next_refund_status = "pending"
    bot = start(db, db_url, slack, polar, smtp, tmp_path)
    try:
        case_id, _ = open_case(bot, slack, "i-7f3a 2026-10")
        bot.action("case_approve", case_id, "U_AGENT2")
        wait_for(lambda: polar.refunds, what="refund")
        polar.settle_refund(polar.refunds[0]["id"], "succeeded")
        msg = polar.messages("refund.updated")[0]
        for how in ("forged", "old", "unsigned"):
            assert polar.send(msg, how=how).status == 401
        time.sleep(0.5)
        assert case_row(db_url, case_id)[0] == "issuing" and corrections(db_url) == []
        unknown = polar.message("order.updated", polar.orders[0])
        assert polar.send(unknown).status == 200
        assert polar.send(msg).status == 200
        wait_for(lambda: case_row(db_url, case_id)[0] == "issued", what="issued on the signed delivery")
    finally:
        bot.stop()
