"""SPEC 5.3 and the customer check over the served bot, as Slack drives it: /billing-remediate as a
lead, the plan message with its buttons, an approval one level too low refused, the lead's approval,
fifty refunds in our Polar, fifty corrections rows with the batch as ticket, fifty emails and one
progress message that ends "50 of 50 issued"; and /billing-check customer opening one case over
several instances, approved and issued once."""
import json
import time
from datetime import datetime, timezone

import psycopg
import pytest

from .fakes.slack_server import FakeSlack
from .seed import instance, record
from .slack_harness import Bot, wait_for
from .test_money_safety_e2e import issuing_env
from .test_remediation_batch import seed_customers
from .test_slack_e2e import GROUPS


@pytest.fixture
def slack():
    fake = FakeSlack({k: list(v) for k, v in GROUPS.items()}).start()
    yield fake
    fake.stop()


def rows(db_url, sql, args=()):
    with psycopg.connect(db_url) as conn:
        return conn.execute(sql, args).fetchall()


def batch_action(bot, action_id, value, user, channel="C_SUPPORT"):
    payload = {"type": "block_actions", "user": {"id": user}, "team": {"id": "T1"}, "api_app_id": "A1",
               "trigger_id": "trig-3", "channel": {"id": channel}, "container": {"type": "message"},
               "actions": [{"action_id": action_id, "block_id": "b", "value": str(value), "type": "button"}]}
    return bot.post({"payload": json.dumps(payload)})


def plan_posts(slack):
    return [m for m in slack.of("chat.postMessage")
            if m.get("channel") == "C_SUPPORT" and (m.get("text") or "").startswith("Remediation plan batch-")]


def test_fifty_customers_remediated_with_one_approval(db, db_url, slack, polar, smtp, tmp_path):
    seed_customers(db, polar, n=50, instances_each=1)  # $2.08 each: $104.00 in all, level 2
    bot = Bot(db_url, slack, tmp_path, extra_env=issuing_env(polar, smtp, BILLING_BOT_BATCH_TICK_S="0.3"))
    try:
        t0 = time.perf_counter()
        r = bot.command("duplicate_charge 2026-10", user="U_LEAD", name="/billing-remediate")
        assert r.status_code == 200 and r.json()["response_type"] == "ephemeral"
        assert "Computing the remediation plan" in r.json()["text"] and time.perf_counter() - t0 < 3
        plan = wait_for(lambda: plan_posts(slack), timeout=30, what="the plan message")[0]
        text = json.dumps(plan["blocks"], ensure_ascii=False)
        batch_id = int(rows(db_url, "SELECT id FROM billing_bot.remediation_batches")[0][0])
        assert plan["text"].startswith(f"Remediation plan batch-{batch_id}: duplicate_charge 2026-10: 50 customers")
        assert "$104.00" in text and "level 2 (Support lead)" in text and "Largest customers" in text
        assert "wrong_tier (50 customers)" in text and "…and 40 more in the CSV" in text
        buttons = [b for b in plan["blocks"] if b["type"] == "actions"][0]["elements"]
        assert [(b["action_id"], b["value"]) for b in buttons] == [("batch_approve", str(batch_id)),
                                                                    ("batch_reject", str(batch_id))]
        assert rows(db_url, "SELECT channel_id, message_ts IS NOT NULL FROM billing_bot.remediation_batches")[0] == \
            ("C_SUPPORT", True)
        # Level 3 is informed, with a link to the plan
        eng = wait_for(lambda: [m for m in slack.of("chat.postMessage") if m["channel"] == "C_ENG"], what="engineering")
        assert f"batch-{batch_id}" in eng[0]["text"] and "archives/C_SUPPORT" in eng[0]["text"]
        # the CSV in the plan's thread, through Slack's external upload, byte for byte the plan's
        plan_ts = rows(db_url, "SELECT message_ts FROM billing_bot.remediation_batches")[0][0]
        files = wait_for(lambda: slack.shared_files("C_SUPPORT", plan_ts), what="the plan's CSV")
        assert [f["filename"] for f in files] == [f"batch-{batch_id}-duplicate_charge-2026-10.csv"]
        lines = files[0]["content"].decode().splitlines()
        assert lines[0] == "customer_id,instance_ids,hours,credit_cents" and len(lines) == 51
        assert sum(int(line.rsplit(",", 1)[1]) for line in lines[1:]) == 10400

        # an agent (level 1) is one level too low: refused, privately, and nothing moves
        batch_action(bot, "batch_approve", batch_id, "U_AGENT")
        refusal = wait_for(lambda: slack.of("chat.postEphemeral"), what="refusal")[0]
        assert refusal["user"] == "U_AGENT" and "needs level 2 (Support lead)" in refusal["text"]
        assert "<@U_LEAD>" in refusal["text"]
        esc = wait_for(lambda: [m for m in slack.of("chat.postMessage") if m["channel"] == "C_ESC"], what="escalation")
        assert "<!subteam^S_LEADS>" in esc[0]["text"] and f"batch-{batch_id}" in esc[0]["text"]
        assert rows(db_url, "SELECT state FROM billing_bot.remediation_batches")[0][0] == "planned"
        assert rows(db_url, "SELECT count(*) FROM billing_bot.cases")[0][0] == 0 and polar.refunds == []

        batch_action(bot, "batch_approve", batch_id, "U_LEAD2")  # a lead by user group, read live
        wait_for(lambda: len(polar.refunds) == 50, timeout=40, what="fifty refunds")
        corr = wait_for(lambda: (lambda r: r if len(r) == 50 else None)(
            rows(db_url, "SELECT customer_id, ticket_id, credit_amount FROM billing_corrections")), timeout=20,
            what="fifty corrections")
        assert {t for _, t, _ in corr} == {f"batch-{batch_id}"} and len({c for c, _, _ in corr}) == 50
        assert all(str(a) == "2.08" for _, _, a in corr)
        wait_for(lambda: len(smtp.messages) == 50, timeout=20, what="fifty emails")
        assert sorted(to[0] for to, _ in smtp.messages) == sorted(f"c-{i:02d}@example.com" for i in range(50))

        def progress_texts():
            posted = [m for m in slack.of("chat.postMessage") if m.get("thread_ts") and "issued" in (m.get("text") or "")
                      and f"batch-{batch_id} (" in m["text"]]
            if not posted:
                return []
            ts = rows(db_url, "SELECT progress_ts FROM billing_bot.remediation_batches WHERE id = %s", (batch_id,))[0][0]
            return [posted, [m["text"] for m in posted] + [u["text"] for u in slack.of("chat.update") if u["ts"] == ts]]
        posted, texts = wait_for(lambda: (lambda p: p if p and "50 of 50 issued" in p[1][-1] else None)(
            progress_texts()), timeout=20, what="the progress message saying 50 of 50")
        assert len(posted) == 1, "one progress message, updated in place"
        assert texts[-1].startswith(f":white_check_mark: batch-{batch_id} (duplicate_charge 2026-10): 50 of 50 issued ($104.00)")
        # the plan says who approved it, and has no buttons any more
        approved = [u for u in slack.of("chat.update") if "Approved by <@U_LEAD2>" in json.dumps(u.get("blocks"), ensure_ascii=False)]
        assert approved and not [b for b in approved[-1]["blocks"] if b["type"] == "actions"]
        assert rows(db_url, "SELECT state, finished FROM billing_bot.remediation_batches")[0] == ("approved", True)
        assert rows(db_url, "SELECT count(*), count(DISTINCT customer_id) FROM billing_bot.cases"
                            " WHERE batch_id = %s AND state = 'issued'", (batch_id,))[0] == (50, 50)
    finally:
        bot.stop()


def test_bad_remediate_input_is_refused_privately_and_stores_nothing(db, db_url, slack, tmp_path):
    bot = Bot(db_url, slack, tmp_path)
    try:
        for text, says in (("duplicates 2026-10", "unknown finding kind 'duplicates'"),
                           ("duplicate_charge 2026-13", "malformed period"),
                           ("duplicate_charge 2099-01", "2099-01 is in the future"),
                           ("", "usage: /billing-remediate")):
            body = bot.command(text, user="U_LEAD", name="/billing-remediate").json()
            assert body["response_type"] == "ephemeral" and says in body["text"], body
        body = bot.command("bogus 2026-10", user="U_LEAD", name="/billing-remediate").json()
        assert "duplicate_charge, stuck_instance, throttle_continuous, throttle_daily, wrong_tier" in body["text"]
        time.sleep(0.3)
        assert slack.of("chat.postMessage") == []
        assert rows(db_url, "SELECT count(*) FROM billing_bot.remediation_batches")[0][0] == 0
    finally:
        bot.stop()


def test_a_customer_check_opens_one_case_over_its_instances_and_an_approval_issues_it(db, db_url, slack, polar, smtp,
                                                                                       tmp_path):
    polar.add_customer("c-multi", email="grace@example.com", name="Grace Hopper")
    polar.add_order("c-multi", datetime(2026, 11, 1, 0, 5, tzinfo=timezone.utc), 100_00)
    rid = 1
    for k in range(3):
        iid = f"i-multi-{k}"
        instance(db, iid, org="o-multi", customer="c-multi", tier="gpu", heartbeat="2026-10-31 23:00")
        for _ in range(2 if k < 2 else 1):  # two instances billed twice for one hour, the third once
            record(db, rid, iid, "2026-10-05 08:00", "2026-10-05 09:00", "2.08", org="o-multi", customer="c-multi")
            rid += 1
    bot = Bot(db_url, slack, tmp_path, extra_env=issuing_env(polar, smtp))
    try:
        assert bot.command("customer c-multi 2026-10 T-9").status_code == 200
        upd = wait_for(lambda: [u for u in slack.of("chat.update") if u.get("blocks")], what="case message")[0]
        text = json.dumps(upd["blocks"], ensure_ascii=False)
        header = upd["blocks"][0]["text"]["text"]
        case_id = int([b for b in upd["blocks"] if b["type"] == "actions"][0]["elements"][0]["value"])
        assert header == f"Billing case #{case_id} · c-multi (3 instances)"
        assert "*i-multi-0* — *$2.08*" in text and "*i-multi-1* — *$2.08*" in text and "Approve $4.16 (refund)" in text
        assert "No findings on 1 instance: i-multi-2" in text and "ticket T-9" in text
        assert rows(db_url, "SELECT instance_id, instance_ids FROM billing_bot.cases")[0] == \
            (None, ["i-multi-0", "i-multi-1", "i-multi-2"])
        thread = wait_for(lambda: [m for m in slack.of("chat.postMessage") if m.get("thread_ts") == upd["ts"]],
                          what="evidence")
        assert "*Instance i-multi-0* (o-multi): $2.08" in thread[0]["text"]
        # a second check of the customer shows the case that holds the time
        bot.command("customer c-multi 2026-10")
        again = wait_for(lambda: [u for u in slack.of("chat.update") if "already holds" in (u.get("text") or "")],
                         what="existing case")
        assert f"Case #{case_id} already holds this billed time of c-multi (3 instances)" in again[0]["text"]
        assert rows(db_url, "SELECT count(*) FROM billing_bot.cases")[0][0] == 1
        assert bot.action("case_approve", case_id, "U_AGENT").status_code == 200
        wait_for(lambda: len(smtp.messages) == 1, timeout=20, what="the customer's email")
        assert [r["amount"] for r in polar.refunds] == [416]
        assert "your instances i-multi-0, i-multi-1, i-multi-2 (October 2026 usage)" in smtp.messages[0][1]
        corr = rows(db_url, "SELECT customer_id, ticket_id, credit_amount FROM billing_corrections")
        assert [(c, t, str(a)) for c, t, a in corr] == [("c-multi", "T-9", "4.16")]
    finally:
        bot.stop()
