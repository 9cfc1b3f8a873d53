"""Attack 5 over the served bot (SPEC 5.3): an old plan's Approve button after the plan was
superseded, a batch approved one level too low, Slack down right after the approval (money moves
once, the progress message appears when Slack is back), and stale case buttons on a batch case
(case_approve on an issued one, case_retry with an old failure number, by someone too low)."""
import time

from .seed import record
from .slack_harness import Bot, wait_for
from .test_attack3_batch_races import refunded_by_customer
from .test_money_safety_e2e import issuing_env
from .test_remediation_batch import seed_customers
from .test_remediation_slack_e2e import batch_action, plan_posts, rows, slack  # noqa: F401 (fixture)


def test_old_buttons_a_level_too_low_and_slack_down_after_the_approval(db, db_url, slack, polar, smtp, tmp_path):
    rid = seed_customers(db, polar, n=25, instances_each=2)  # $104.00 in all: level 2
    polar.orders.pop()  # c-24 has no order: its case fails, with a retry button
    bot = Bot(db_url, slack, tmp_path, extra_env=issuing_env(polar, smtp, BILLING_BOT_BATCH_TICK_S="0.3"))
    try:
        bot.command("duplicate_charge 2026-10", user="U_LEAD", name="/billing-remediate")
        wait_for(lambda: plan_posts(slack), timeout=30, what="the plan")
        first = int(rows(db_url, "SELECT id FROM billing_bot.remediation_batches")[0][0])
        # a third copy of one hour arrives: the approval supersedes the plan and posts a new one
        record(db, rid, "i-01-0", "2026-10-05 08:00", "2026-10-05 09:00", "2.08", org="o-01", customer="c-01")
        batch_action(bot, "batch_approve", first, "U_LEAD2")
        wait_for(lambda: len(plan_posts(slack)) == 2, timeout=30, what="the new plan")
        second = int(rows(db_url, "SELECT max(id) FROM billing_bot.remediation_batches")[0][0])
        assert rows(db_url, "SELECT state FROM billing_bot.remediation_batches WHERE id = %s", (first,))[0][0] \
            == "superseded"
        # the old plan's button, pressed afterwards by a VP: nothing opens, nothing moves
        n_eph = len(slack.of("chat.postEphemeral"))
        batch_action(bot, "batch_approve", first, "U_VP")
        old = wait_for(lambda: slack.of("chat.postEphemeral")[n_eph:], what="the old button's answer")
        assert "replaced by a newer plan" in old[0]["text"], old[0]["text"]
        # one level too low on the new plan
        batch_action(bot, "batch_approve", second, "U_AGENT")
        low = wait_for(lambda: slack.of("chat.postEphemeral")[n_eph + 1:], what="the refusal")
        assert "needs level 2" in low[0]["text"], low[0]["text"]
        time.sleep(0.3)
        assert rows(db_url, "SELECT count(*) FROM billing_bot.cases")[0][0] == 0 and polar.refunds == []
        assert rows(db_url, "SELECT state FROM billing_bot.remediation_batches WHERE id = %s", (second,))[0][0] \
            == "planned"

        # Slack goes down right after the decision reaches the bot
        batch_action(bot, "batch_approve", second, "U_LEAD2")
        slack.down.update({"chat.postMessage", "chat.update", "chat.postEphemeral"})
        wait_for(lambda: len(polar.refunds) == 24, timeout=40, what="24 refunds")
        wait_for(lambda: rows(db_url, "SELECT count(*) FROM billing_bot.cases WHERE batch_id = %s AND state IN "
                                      "('issued','failed')", (second,))[0][0] == 25, timeout=30, what="settled")
        time.sleep(1.0)
        owed = {f"c-{i:02d}": 416 for i in range(24)}
        owed["c-01"] = 624
        assert refunded_by_customer(polar) == owed
        slack.down.clear()

        def progress():
            ts = rows(db_url, "SELECT progress_ts FROM billing_bot.remediation_batches WHERE id = %s", (second,))[0][0]
            texts = [m.get("text") or "" for m in slack.of("chat.postMessage") if f"batch-{second} (" in
                     (m.get("text") or "")] + [u.get("text") or "" for u in slack.of("chat.update") if ts and
                                                u.get("ts") == ts]
            return ts and [t for t in texts if "24 of 25 issued" in t]
        wait_for(progress, timeout=20, what="the progress message once Slack is back")

        # stale case buttons on the batch's cases
        issued_id = rows(db_url, "SELECT id FROM billing_bot.cases WHERE batch_id = %s AND state = 'issued' LIMIT 1",
                         (second,))[0][0]
        failed_id, failures = rows(db_url, "SELECT id, failures FROM billing_bot.cases WHERE batch_id = %s"
                                           " AND state = 'failed'", (second,))[0]
        n_eph = len(slack.of("chat.postEphemeral"))
        bot.action("case_approve", issued_id, "U_VP")
        for value, user in ((f"{failed_id}:{failures - 1}", "U_LEAD2"), (f"{failed_id}:{failures}", "U_NOBODY")):
            batch_action(bot, "case_retry", value, user)
        wait_for(lambda: len(slack.of("chat.postEphemeral")) >= n_eph + 3, what="three answers")
        time.sleep(0.5)
        assert rows(db_url, "SELECT state, failures FROM billing_bot.cases WHERE id = %s", (failed_id,))[0] == \
            ("failed", failures)
        assert refunded_by_customer(polar) == owed
        assert rows(db_url, "SELECT customer_id, count(*) FROM billing_corrections GROUP BY 1 HAVING count(*) > 1") \
            == []
        assert rows(db_url, "SELECT count(*) FROM billing_bot.cases WHERE batch_id = %s", (first,))[0][0] == 0
    finally:
        bot.stop()
