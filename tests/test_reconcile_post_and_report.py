"""Reconciliation posted to Slack with its "Open case" buttons; the credits review against billing_corrections."""
import json
import subprocess
import sys

import psycopg
import pytest

from .fakes.slack_server import BOT_TOKEN, FakeSlack
from .slack_harness import Bot, wait_for
from .test_reconcile import seed_all_kinds


@pytest.fixture
def slack():
    fake = FakeSlack().start()
    yield fake
    fake.stop()


def test_post_groups_by_kind_and_open_case_starts_a_check(db, db_url, slack, tmp_path):
    seed_all_kinds(db)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("channels: {alerts: C_ALERTS}\nlevels: {1: {users: [U_AGENT]}}\n")
    env = {"DATABASE_URL": db_url, "SLACK_BOT_TOKEN": BOT_TOKEN, "SLACK_API_URL": slack.api_url,
           "BILLING_BOT_CONFIG": str(cfg), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "bot.cli", "reconcile", "--date", "2026-10-05", "--post"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    posted = slack.of("chat.postMessage")
    assert len(posted) == 1 and posted[0]["channel"] == "C_ALERTS"
    text = json.dumps(posted[0]["blocks"], ensure_ascii=False)
    assert "*9 anomalies*" in text and "*daily_limit*: 1" in text and "*duplicate*: 1 · $2.08" in text
    buttons = [b["accessory"] for b in posted[0]["blocks"] if "accessory" in b]
    values = {b["value"] for b in buttons}
    assert "i-dup 2026-10" in values and "i-d1 2026-10" in values  # the org-level daily anomaly gets an instance
    # clicking "Open case" in the served bot starts the /billing-check flow for that instance
    bot = Bot(db_url, slack, tmp_path)
    try:
        payload = {"type": "block_actions", "user": {"id": "U_AGENT"}, "team": {"id": "T1"}, "api_app_id": "A1",
                   "trigger_id": "t", "channel": {"id": "C_ALERTS"}, "container": {"type": "message"},
                   "actions": [{"action_id": "open_case", "value": "i-dup 2026-10", "type": "button", "block_id": "b"}]}
        assert bot.post({"payload": json.dumps(payload)}).status_code == 200
        upd = wait_for(lambda: slack.of("chat.update"), what="case from the alert")[0]
        assert "i-dup" in json.dumps(upd["blocks"]) and "duplicate_charge" in json.dumps(upd["blocks"])
    finally:
        bot.stop()


def seed_corrections(db):
    rows = [("c-a", "T-1", "duplicate_charge", "10.28", "U_AGENT", "2026-11-20 10:00Z"),
            ("c-a", "T-2", "wrong_tier", "3.00", "U_LEAD", "2026-11-21 10:00Z"),
            ("c-b", None, "stuck_instance", "99.84", "U_LEAD", "2026-11-22 10:00Z"),
            ("c-c", "T-3", "duplicate_charge", "1.00", "U_AGENT", "2026-10-01 10:00Z")]  # before the window
    for r in rows:
        db.execute("INSERT INTO billing_corrections (customer_id, ticket_id, issue_type, credit_amount, resolved_by,"
                   " resolved_at, notes) VALUES (%s,%s,%s,%s,%s,%s,'n')", r)


def test_report_sums_agree_with_billing_corrections(db, db_url):
    seed_corrections(db)
    env = {"DATABASE_URL": db_url, "PATH": "/usr/bin:/bin"}
    text = subprocess.run([sys.executable, "-m", "bot.cli", "report", "--since", "2026-11-15"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert text.returncode == 0, text.stderr
    out = text.stdout
    with psycopg.connect(db_url) as conn:
        total = conn.execute("SELECT sum(credit_amount) FROM billing_corrections WHERE resolved_at >= '2026-11-15'").fetchone()[0]
    assert f"Credits issued since 2026-11-15: 3 for ${total:,.2f}" in out
    assert "duplicate_charge: 1 credit(s), $10.28" in out and "stuck_instance: 1 credit(s), $99.84" in out
    assert "U_LEAD: 2 credit(s), $102.84" in out and "c-a: 2 credit(s), $13.28" in out
    csv_out = subprocess.run([sys.executable, "-m", "bot.cli", "report", "--since", "2026-11-15", "--csv"], env=env,
                             capture_output=True, text=True, timeout=60).stdout.splitlines()
    assert csv_out[0] == "id,resolved_at,customer_id,ticket_id,issue_type,credit_amount,resolved_by,notes"
    assert len(csv_out) == 4 and sum(float(line.split(",")[5]) for line in csv_out[1:]) == pytest.approx(113.12)
    bad = subprocess.run([sys.executable, "-m", "bot.cli", "report", "--since", "last week"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "malformed date 'last week'" in bad.stderr


def test_billing_report_command_answers_privately(db, db_url, slack, tmp_path):
    seed_corrections(db)
    db.execute("UPDATE billing_corrections SET resolved_at = now()")
    bot = Bot(db_url, slack, tmp_path)
    try:
        r = bot.post({"command": "/billing-report", "text": "week", "user_id": "U_LEAD", "channel_id": "C1",
                      "team_id": "T1", "trigger_id": "t"})
        assert r.status_code == 200
        msg = wait_for(lambda: slack.of("chat.postEphemeral"), what="report")[0]
        assert msg["user"] == "U_LEAD" and "4 for $114.12" in msg["text"]
        bad = bot.post({"command": "/billing-report", "text": "year", "user_id": "U_LEAD", "channel_id": "C1",
                        "team_id": "T1", "trigger_id": "t"})
        assert "unknown span 'year'" in bad.json()["text"]
    finally:
        bot.stop()


def test_billing_report_usage_answers_privately_with_the_months_audit(db, db_url, slack, tmp_path):
    from datetime import datetime, timezone

    from .seed import record
    now = datetime.now(timezone.utc).strftime("%Y-%m")
    record(db, 9001, "i-now", f"{now}-01 08:00", f"{now}-01 10:00", "4.16", customer="c-now")
    seed_all_kinds(db)  # 2026-10-05, every kind, reconciled: October's customers show their anomalies
    env = {"DATABASE_URL": db_url, "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "bot.cli", "reconcile", "--date", "2026-10-05"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    bot = Bot(db_url, slack, tmp_path)

    def command(text):
        return bot.post({"command": "/billing-report", "text": text, "user_id": "U_LEAD", "channel_id": "C1",
                         "team_id": "T1", "trigger_id": "t", "response_url": slack.response_url})
    try:
        assert command("usage").status_code == 200  # this month by default
        first = wait_for(lambda: slack.of("response_url"), what="usage report")[0]
        assert first["response_type"] == "ephemeral" and first["blocks"][0]["text"]["text"] == f"Usage in {now}"
        assert "c-now" in json.dumps(first["blocks"]) and "$4.16" in json.dumps(first["blocks"])
        assert command("usage 2026-10").status_code == 200
        oct_ = wait_for(lambda: slack.of("response_url")[1:], what="October's report")[0]
        blocks = json.dumps(oct_["blocks"])
        assert "Usage in 2026-10" in blocks and "Anomalies from 1 of 31 days reconciled" in blocks
        line = next(b["text"]["text"] for b in oct_["blocks"] if "c-u*" in b.get("text", {}).get("text", ""))
        assert "Anomalies: duplicate 1 ($2.08)" in line
        # malformed: a specific private error at once, nothing read, nothing posted
        for text, words in [("usage 2026-13", "'2026-13' is not a month: expected YYYY-MM with a month 01-12"),
                            ("usage foo", "'foo' is not a month"),
                            ("usage 2026-10 2026-11", "usage takes one month, got '2026-10 2026-11'")]:
            r = command(text)
            assert r.status_code == 200 and r.json()["response_type"] == "ephemeral", text
            assert words in r.json()["text"] and "/billing-report usage [YYYY-MM]" in r.json()["text"], r.json()
        import time
        time.sleep(0.5)
        assert len(slack.of("response_url")) == 2 and slack.of("chat.postEphemeral") == []
    finally:
        bot.stop()


def _remediate_buttons(msg):
    return [e for b in msg["blocks"] if b["type"] == "actions" for e in b["elements"]
            if e["action_id"] == "remediate_plan"]


def test_remediate_all_is_offered_per_finding_kind_that_reached_the_systematic_threshold():
    from datetime import date

    from bot.reconcile_post import reconciliation_blocks
    from services.reconcile import Anomaly, Reconciliation

    def a(kind, customer, cents=100, instance="i-x", org="o-1"):
        return Anomaly(kind, instance, org, customer, [1], cents, "d")
    rec = Reconciliation(date(2026, 10, 5), [
        # duplicate_charge: c-1 and c-2 by duplicate, c-3 by overlap (and c-1 again): 3 customers
        a("duplicate", "c-1"), a("duplicate", "c-2"), a("overlap", "c-3"), a("overlap", "c-1"),
        # throttle_daily: 3 customers, org-level anomalies
        a("daily_limit", "c-4", instance=None, org="o-4"), a("daily_limit", "c-5", instance=None, org="o-5"),
        a("daily_limit", "c-6", instance=None, org="o-6"),
        # stuck_instance: 2 customers only; wrong_tier: 3 customers but one with no overcharge
        a("billed_after_stop", "c-1"), a("billed_while_idle", "c-2"),
        a("rate_mismatch", "c-1"), a("rate_mismatch", "c-2"), a("rate_mismatch", "c-3", cents=0),
        # no finding kind: never a button, however many customers
        a("charge_mismatch", "c-1", 0), a("charge_mismatch", "c-2", 0), a("charge_mismatch", "c-3", 0),
        a("usage_mismatch", "c-1", 0), a("usage_mismatch", "c-2", 0), a("usage_mismatch", "c-3", 0)])
    msg = reconciliation_blocks(rec, {}, frozenset(), 3)
    buttons = _remediate_buttons(msg)
    assert [b["value"] for b in buttons] == ["throttle_daily 2026-10", "duplicate_charge 2026-10"]  # SPEC 5.2's order
    assert [b["text"]["text"] for b in buttons] == ["Remediate all throttle_daily (3 customers)",
                                                    "Remediate all duplicate_charge (3 customers)"]
    assert msg["blocks"][-1]["block_id"] == "remediate_plans"
    assert [b["value"] for b in _remediate_buttons(reconciliation_blocks(rec, {}, frozenset(), 2))] == [
        "throttle_daily 2026-10", "wrong_tier 2026-10", "duplicate_charge 2026-10", "stuck_instance 2026-10"]
    assert _remediate_buttons(reconciliation_blocks(rec, {}, frozenset(), 4)) == []
    assert _remediate_buttons(reconciliation_blocks(rec, {})) == []  # no threshold given: no offer
    # a long day keeps its buttons: the last block survives Block Kit's 50-block cut
    from services.reconcile import KIND_ORDER
    many = Reconciliation(rec.day, rec.anomalies + [a(k, f"c-{k}-{n}", instance=f"i-{k}-{n}")
                                                     for k in KIND_ORDER[:9] for n in range(30)])
    big = reconciliation_blocks(many, {}, frozenset(f"c-overlap-{n}" for n in range(30)), 3)
    assert len(big["blocks"]) == 50
    assert "throttle_continuous 2026-10" in [b["value"] for b in _remediate_buttons(big)]


def test_the_posted_morning_message_offers_remediate_all_for_the_configured_threshold(db, db_url, slack, tmp_path):
    seed_all_kinds(db)  # one customer per kind: reaches a threshold of 1, not the default 3
    cfg = tmp_path / "c.yaml"
    env = {"DATABASE_URL": db_url, "SLACK_BOT_TOKEN": BOT_TOKEN, "SLACK_API_URL": slack.api_url,
           "BILLING_BOT_CONFIG": str(cfg), "PATH": "/usr/bin:/bin"}
    for threshold in (3, 1):
        cfg.write_text(f"channels: {{alerts: C_ALERTS}}\nsystematic_min_customers: {threshold}\n")
        proc = subprocess.run([sys.executable, "-m", "bot.cli", "reconcile", "--date", "2026-10-05", "--post"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    default, low = slack.of("chat.postMessage")
    assert _remediate_buttons(default) == []
    assert sorted(b["value"] for b in _remediate_buttons(low)) == sorted(
        f"{k} 2026-10" for k in ("throttle_daily", "throttle_continuous", "wrong_tier", "duplicate_charge",
                                 "stuck_instance"))
