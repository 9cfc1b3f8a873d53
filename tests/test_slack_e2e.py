"""The Slack bot end to end: the real `billing-bot serve` process, signed requests as Slack sends
them, our Slack Web API on 127.0.0.1, and real PostgreSQL."""
import json
import threading
import time

import psycopg
import pytest

from .fakes.slack_server import FakeSlack
from .seed import instance, record
from .slack_harness import Bot, sign, wait_for

GROUPS = {"S_AGENTS": ["U_AGENT3"], "S_LEADS": ["U_LEAD2"], "S_ENG": ["U_ENG"]}


@pytest.fixture
def slack():
    fake = FakeSlack(GROUPS).start()
    yield fake
    fake.stop()


def seed_cases(db):
    # the worked example: $10.28, level 1
    instance(db, "i-7f3a", tier="small", heartbeat="2026-10-05 09:00")
    record(db, 1, "i-7f3a", "2026-10-05 08:00", "2026-10-05 10:00", "4.16")
    record(db, 2, "i-7f3a", "2026-10-05 08:00", "2026-10-05 10:00", "4.16")
    record(db, 3, "i-7f3a", "2026-10-05 10:00", "2026-10-05 11:00", "2.08")
    # stopped, then billed 48 more hours of gpu: $99.84, level 2
    instance(db, "i-stuck", status="stopped", stopped_at="2026-10-12 17:00", heartbeat="2026-10-12 16:59")
    for h in range(48):
        day, hour = divmod(17 + h, 24)
        nday, nhour = divmod(18 + h, 24)
        record(db, 100 + h, "i-stuck", f"2026-10-{12 + day:02d} {hour:02d}:00", f"2026-10-{12 + nday:02d} {nhour:02d}:00", "2.08")


@pytest.fixture
def bot(db, db_url, slack, tmp_path):
    seed_cases(db)
    b = Bot(db_url, slack, tmp_path)
    yield b
    b.stop()


def case_row(db_url, case_id):
    with psycopg.connect(db_url) as conn:
        return conn.execute("SELECT state, decided_by, credit_cents, required_level, reason FROM billing_bot.cases"
                            " WHERE id = %s", (case_id,)).fetchone()


def events(db_url, case_id):
    with psycopg.connect(db_url) as conn:
        return [r[0] for r in conn.execute("SELECT action FROM billing_bot.case_events WHERE case_id = %s ORDER BY id",
                                           (case_id,))]


def open_case(bot, slack, text, user="U_AGENT"):
    before = len(slack.of("chat.update"))
    r = bot.command(text, user=user)
    assert r.status_code == 200
    upd = wait_for(lambda: len(slack.of("chat.update")) > before and slack.of("chat.update")[before], what="case message")
    buttons = [b for b in upd["blocks"] if b["type"] == "actions"]
    return int(buttons[0]["elements"][0]["value"]) if buttons else None, upd


def test_command_to_case_message(bot, slack):
    t0 = time.perf_counter()
    r = bot.command("i-7f3a 2026-10 T-42")
    ack_ms = (time.perf_counter() - t0) * 1000
    assert r.status_code == 200 and ack_ms < 3000
    first = wait_for(lambda: slack.of("chat.postMessage"), what="investigating message")[0]
    assert first["text"] == ":mag: Investigating i-7f3a…" and first["channel"] == "C_SUPPORT"
    upd = wait_for(lambda: slack.of("chat.update"), what="case message")[0]
    text = json.dumps(upd["blocks"])
    assert "Approve $10.28 (refund)" in text and "duplicate_charge" in text and "ticket T-42" in text
    assert "level 1 (Support agent)" in text
    case_ts = "1700000000.000001"  # the 'Investigating' message became the case; evidence is its thread
    thread = wait_for(lambda: [m for m in slack.of("chat.postMessage") if m.get("thread_ts") == case_ts],
                      what="evidence thread")
    assert any("record #2 duplicates #1" in m["text"] for m in thread)


def test_malformed_id_gets_an_ephemeral_error_and_touches_nothing(bot, slack, db_url):
    r = bot.command("I_AM_BAD")
    assert r.status_code == 200
    body = r.json()
    assert body["response_type"] == "ephemeral" and "invalid instance id 'I_AM_BAD'" in body["text"]
    time.sleep(0.3)
    assert slack.of("chat.postMessage") == []
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM billing_bot.cases").fetchone()[0] == 0


def test_modal_reports_bad_fields_next_to_the_field(bot, slack):
    assert bot.command("").status_code == 200
    view = wait_for(lambda: slack.of("views.open"), what="modal")[0]["view"]
    assert view["callback_id"] == "billing_check_modal"
    r = bot.submit_view("billing_check_modal", {"instance": "BAD ID", "period": "2026-13", "ticket": ""}, "U_AGENT",
                        private_metadata="C_SUPPORT")
    body = r.json()
    assert body["response_action"] == "errors"
    assert "invalid instance id" in body["errors"]["instance"] and "malformed period" in body["errors"]["period"]
    r = bot.submit_view("billing_check_modal", {"instance": "i-7f3a", "period": "2026-10", "ticket": "T-7"}, "U_AGENT",
                        private_metadata="C_SUPPORT")
    assert r.status_code == 200 and r.text == ""
    upd = wait_for(lambda: slack.of("chat.update"), what="case message")[0]
    assert "Approve $10.28" in json.dumps(upd["blocks"])


def test_agent_approves_within_50(bot, slack, db_url):
    case_id, _ = open_case(bot, slack, "i-7f3a 2026-10")
    assert bot.action("case_approve", case_id, "U_AGENT2").status_code == 200
    wait_for(lambda: case_row(db_url, case_id)[0] == "approved", what="approval")
    assert case_row(db_url, case_id)[:2] == ("approved", "U_AGENT2")
    upd = wait_for(lambda: [u for u in slack.of("chat.update") if "Approved by <@U_AGENT2>" in json.dumps(u["blocks"])],
                   what="updated message")
    assert not [b for b in upd[-1]["blocks"] if b["type"] == "actions"]
    assert events(db_url, case_id) == ["opened", "approved"]


def test_agent_refused_above_50_and_the_lead_pinged_then_lead_approves(bot, slack, db_url):
    case_id, upd = open_case(bot, slack, "i-stuck 2026-10", user="U_AGENT")
    assert "level 2 (Support lead)" in json.dumps(upd["blocks"])
    # opened by an agent whose authority does not cover $99.84: the leads are pinged at once
    esc = wait_for(lambda: [m for m in slack.of("chat.postMessage") if m["channel"] == "C_ESC"], what="escalation")
    assert "<!subteam^S_LEADS>" in esc[0]["text"] and "<@U_LEAD>" in esc[0]["text"] and "archives/C_SUPPORT" in esc[0]["text"]
    # the DMs follow the escalation post: wait for them rather than race them
    dms = wait_for(lambda: {"U_LEAD", "U_LEAD2"} <= {m["channel"] for m in slack.of("chat.postMessage")
                                                     if m["channel"].startswith("U_")}, what="DMs to the leads")
    assert dms
    bot.action("case_approve", case_id, "U_AGENT")
    refusal = wait_for(lambda: slack.of("chat.postEphemeral"), what="refusal")[0]
    assert refusal["user"] == "U_AGENT" and "needs level 2 (Support lead)" in refusal["text"]
    wait_for(lambda: "refused" in events(db_url, case_id), what="refusal logged")
    assert case_row(db_url, case_id)[0] == "pending"
    bot.action("case_approve", case_id, "U_LEAD2")  # a member of the leads' user group, read live
    wait_for(lambda: case_row(db_url, case_id)[0] == "approved", what="lead approval")
    assert case_row(db_url, case_id)[1] == "U_LEAD2"


def test_adjust_lowers_and_recomputes_the_level_and_reject_needs_a_reason(bot, slack, db_url):
    case_id, _ = open_case(bot, slack, "i-stuck 2026-10", user="U_LEAD")
    bot.action("case_adjust", case_id, "U_LEAD")
    modal = wait_for(lambda: slack.of("views.open"), what="adjust modal")[0]["view"]
    assert modal["private_metadata"] == str(case_id)
    r = bot.submit_view("case_adjust_modal", {"amount": "150.00"}, "U_LEAD", str(case_id))
    assert r.json()["errors"]["amount"].startswith("an adjustment can only lower the credit")
    r = bot.submit_view("case_adjust_modal", {"amount": "abc"}, "U_LEAD", str(case_id))
    assert "not an amount" in r.json()["errors"]["amount"]
    r = bot.submit_view("case_adjust_modal", {"amount": "40.00"}, "U_LEAD", str(case_id))
    assert r.status_code == 200 and r.text == ""
    assert case_row(db_url, case_id)[2:4] == (4000, 1)
    r = bot.submit_view("case_reject_modal", {"reason": "no"}, "U_LEAD", str(case_id))
    assert "say why" in r.json()["errors"]["reason"]
    r = bot.submit_view("case_reject_modal", {"reason": "customer used the instance"}, "U_LEAD", str(case_id))
    assert r.status_code == 200
    row = case_row(db_url, case_id)
    assert row[0] == "rejected" and row[4] == "customer used the instance"
    assert events(db_url, case_id) == ["opened", "adjusted", "rejected"]


def test_concurrent_approvals_and_double_clicks_make_one_decision(bot, slack, db_url):
    case_id, _ = open_case(bot, slack, "i-7f3a 2026-10")
    clicks = [("U_AGENT2", i) for i in range(3)] + [("U_LEAD", i) for i in range(3)]
    threads = [threading.Thread(target=bot.action, args=("case_approve", case_id, u)) for u, _ in clicks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_for(lambda: len(slack.of("chat.postEphemeral")) >= 5, what="five 'already decided' answers")
    assert events(db_url, case_id).count("approved") == 1
    winner = case_row(db_url, case_id)[1]
    assert all(f"already decided: approved by <@{winner}>" in m["text"] for m in slack.of("chat.postEphemeral"))


def test_forged_or_stale_signatures_get_401_and_nothing_happens(bot, slack, db_url):
    from urllib.parse import urlencode
    body = urlencode({"command": "/billing-check", "text": "i-7f3a", "user_id": "U_AGENT", "channel_id": "C1",
                      "team_id": "T1", "trigger_id": "t"})
    forged = sign(body, secret="wrong-secret")
    assert bot.http.post("/slack/events", content=body, headers=forged).status_code == 401
    stale = sign(body, ts=str(int(time.time()) - 3600))
    assert bot.http.post("/slack/events", content=body, headers=stale).status_code == 401
    time.sleep(0.3)
    assert slack.of("chat.postMessage") == []
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM billing_bot.cases").fetchone()[0] == 0


def test_app_home_lists_my_cases_and_those_waiting_for_me(bot, slack):
    open_case(bot, slack, "i-stuck 2026-10", user="U_AGENT")
    payload = {"token": "x", "team_id": "T1", "api_app_id": "A1", "type": "event_callback", "event_id": "Ev1",
               "event_time": int(time.time()), "event": {"type": "app_home_opened", "user": "U_LEAD", "tab": "home"}}
    body = json.dumps(payload)
    headers = sign(body) | {"Content-Type": "application/json"}
    assert bot.http.post("/slack/events", content=body, headers=headers).status_code == 200
    view = wait_for(lambda: slack.of("views.publish"), what="home")[0]
    text = json.dumps(view["view"])
    assert view["user_id"] == "U_LEAD" and "i-stuck" in text and "Waiting for my approval" in text


def test_health_and_metrics(bot, slack):
    assert bot.http.get("/healthz").json() == {"ok": True}
    bot.command("i-7f3a 2026-10")
    wait_for(lambda: slack.of("chat.update"), what="case")
    metrics = bot.http.get("/metrics").text
    assert 'billing_bot_commands_total{command="billing-check"} 1.0' in metrics


def test_reminder_fires_once_per_interval_across_two_bot_processes(db, db_url, slack, tmp_path):
    seed_cases(db)
    bots = [Bot(db_url, slack, tmp_path, remind="2s", tick=0.2) for _ in range(2)]
    try:
        case_id, _ = open_case(bots[0], slack, "i-stuck 2026-10", user="U_AGENT")
        opened = time.time()
        time.sleep(7.2)
        with psycopg.connect(db_url) as conn:
            rows = conn.execute("SELECT detail->>'reminder', at FROM billing_bot.case_events"
                                " WHERE case_id = %s AND action = 'reminded' ORDER BY id", (case_id,)).fetchall()
        elapsed = time.time() - opened
        numbers = [int(r[0]) for r in rows]
        # one reminder per 2 s interval, never two for the same interval, whichever process sent it
        assert numbers == list(range(1, len(numbers) + 1))
        assert int(elapsed // 2) - 1 <= len(numbers) <= int(elapsed // 2)
        gaps = [(b[1] - a[1]).total_seconds() for a, b in zip(rows, rows[1:])]
        assert all(g >= 1.9 for g in gaps), gaps
        pings = [m for m in slack.of("chat.postMessage") if m["channel"] == "C_ESC"]
        assert len(pings) == 1 + len(numbers)  # the first escalation, then one per reminder
    finally:
        for b in bots:
            b.stop()


# --- approve -> issue -> email, through the served bot -----------------------------------------

def issuing_bot(db_url, slack, polar, smtp, tmp_path):
    """The served bot connected to our Polar server and SMTP server, as production issues credits."""
    from .fakes.polar_server import TOKEN
    return Bot(db_url, slack, tmp_path, extra_env={"POLAR_API_URL": polar.url, "POLAR_API_KEY": TOKEN,
                                                   "SMTP_URL": smtp.url})


def test_approve_issues_a_refund_logs_it_and_emails_the_customer(db, db_url, slack, polar, smtp, tmp_path):
    from datetime import datetime, timezone

    seed_cases(db)
    polar.add_customer("c-acme", email="ada@example.com", name="Ada Lovelace")
    polar.add_order("c-acme", datetime(2026, 11, 1, 0, 5, tzinfo=timezone.utc), 5000)
    bot = issuing_bot(db_url, slack, polar, smtp, tmp_path)
    try:
        case_id, _ = open_case(bot, slack, "i-7f3a 2026-10 T-77")
        assert smtp.messages == []
        bot.action("case_approve", case_id, "U_AGENT2")
        wait_for(lambda: case_row(db_url, case_id)[0] == "issued", what="issued")
        wait_for(lambda: smtp.messages, what="email")
        to, content = smtp.messages[0]
        assert to == ["ada@example.com"]
        assert "Subject: Credit Applied - Billing Issue Resolved" in content
        assert "Hello Ada Lovelace," in content and "(Ticket #T-77)" in content
        assert "have refunded $10.28 to your original payment method" in content
        assert len(polar.refunds) == 1 and polar.refunds[0]["amount"] == 1028
        with psycopg.connect(db_url) as conn:
            assert conn.execute("SELECT ticket_id, credit_amount::text, resolved_by FROM billing_corrections").fetchall() \
                == [("T-77", "10.28", "U_AGENT2")]
        # the email goes out before the thread post and the message update: wait for the last step
        wait_for(lambda: "issue_announced" in events(db_url, case_id), what="issue announced")
        thread = [m["text"] for m in slack.of("chat.postMessage") if m.get("thread_ts")]
        assert any("Issued $10.28 by refund" in t and "Root cause" in t for t in thread)
        assert any("Emailed the customer (ada@example.com)" in t for t in thread)
        # the case message is updated last (after the thread note and the letter): wait for it
        final = wait_for(lambda: [u for u in slack.of("chat.update") if "issued in Polar" in json.dumps(u["blocks"])],
                         what="the case message updated")
        assert polar.refunds[0]["id"] in json.dumps(final[-1]["blocks"])
        events_ = events(db_url, case_id)
        assert events_.index("approved") < events_.index("issuing") < events_.index("issued") < events_.index("customer_emailed")
    finally:
        bot.stop()


def test_no_email_when_polar_fails_and_the_case_says_why(db, db_url, slack, polar, smtp, tmp_path):
    seed_cases(db)
    polar.add_customer("c-acme")  # no order invoices October yet
    bot = issuing_bot(db_url, slack, polar, smtp, tmp_path)
    try:
        case_id, _ = open_case(bot, slack, "i-7f3a 2026-10")
        bot.action("case_approve", case_id, "U_AGENT")
        wait_for(lambda: case_row(db_url, case_id)[0] == "failed", what="failed")
        msg = wait_for(lambda: [m for m in slack.of("chat.postMessage") if "failed" in (m.get("text") or "")
                                and m.get("thread_ts")], what="failure in thread")[0]
        assert "2026-10 not invoiced yet" in msg["text"]
        assert [e["action_id"] for e in msg["blocks"][1]["elements"]] == ["case_retry", "case_invoice_credit"]
        # the approver's DM follows the thread post (after a permalink): wait for it rather than race it
        wait_for(lambda: any(m["channel"] == "U_AGENT" and "failed" in m["text"] for m in slack.of("chat.postMessage")),
                 what="the approver's DM")
        time.sleep(0.3)
        assert smtp.messages == [] and polar.refunds == []
        # switch to invoice credit from the button: issued, and the letter says 'next invoice'
        bot.action("case_invoice_credit", case_id, "U_AGENT")
        wait_for(lambda: case_row(db_url, case_id)[0] == "issued", what="issued as invoice credit")
        wait_for(lambda: smtp.messages, what="email")
        assert "This credit will appear on your next invoice." in smtp.messages[0][1]
    finally:
        bot.stop()


def test_the_approver_switches_to_invoice_credit_when_approving(db, db_url, slack, polar, smtp, tmp_path):
    seed_cases(db)
    polar.add_customer("c-acme", email="ada@example.com", name="Ada Lovelace")
    bot = issuing_bot(db_url, slack, polar, smtp, tmp_path)
    try:
        case_id, _ = open_case(bot, slack, "i-7f3a 2026-10")
        bot.action("case_approve_other_method", case_id, "U_AGENT")
        wait_for(lambda: case_row(db_url, case_id)[0] == "issued", what="issued as invoice credit")
        assert polar.refunds == [] and len(polar.events) > 0
        wait_for(lambda: smtp.messages, what="email")
        assert "This credit will appear on your next invoice." in smtp.messages[0][1]
    finally:
        bot.stop()
