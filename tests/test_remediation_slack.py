"""The Slack side of SPEC 5.3 and of the customer/org checks, without a server: each listener called
with a mocked ack (ack first, slow work spawned), the flow's answers to each outcome of the
service, the progress message's claim/post/release, and the Block Kit of plans, progress and cases
over several instances."""
import asyncio
from datetime import date
from decimal import Decimal
from types import SimpleNamespace
from unittest.mock import AsyncMock

import pytest
from slack_sdk.errors import SlackApiError

from bot import remediation_flow
from bot.actions import batch as batch_actions
from bot.blocks import MAX_BLOCKS, batch_reject_modal, case_message, evidence_messages, plan_message, progress_message
from bot.cases_flow import parse_grouped_text
from bot.commands import billing_check, billing_remediate
from bot.context import Metrics
from handlers.remediation import BatchCase, CustomerLine, Plan, batch_progress, plan_record
from services import email
from services.config import parse_config
from services.inputs import InputError
from services.remediation import BatchOutcome

CONFIG = parse_config({"levels": {2: {"users": ["U_LEAD"]}}})


def run(coro):
    return asyncio.run(coro)


def make_plan(n=3, held=(), other=None) -> Plan:
    lines = tuple(CustomerLine(f"c-{i:02d}", (f"i-{i:02d}-0", f"i-{i:02d}-1"), Decimal(2), 416) for i in range(n))
    return Plan(kind="duplicate_charge", period="2026-10", customers=lines, total_cents=416 * n,
                other_kinds=other or {}, instances_checked=2 * n + 1, fingerprint="f", held=tuple(held))


def make_batch(plan: Plan, **kw) -> dict:
    level = CONFIG.required_level(plan.total_cents)
    return {"id": 7, "kind": plan.kind, "period": plan.period, "state": "planned", "required_level": level,
            "total_cents": plan.total_cents, "plan": plan_record(plan, level), "requested_by": "U_LEAD",
            "channel_id": "C1", "message_ts": "1.000001", "progress_ts": None, "decided_by": None, **kw}


def fake_ctx(remediation=None):
    spawned = []
    client = AsyncMock()
    client.chat_postMessage.return_value = {"channel": "C1", "ts": "2.000001"}
    client.chat_getPermalink.return_value = {"permalink": "https://x.slack.com/archives/C1/p1000001"}
    client.files_upload_v2.return_value = {"file": {"id": "F1"}}
    groups = AsyncMock()
    groups.members.return_value = []
    ctx = SimpleNamespace(metrics=Metrics(), config=CONFIG, client=client, remediation=remediation, groups=groups,
                          spawn=lambda coro, what="": spawned.append((coro, what)))
    ctx.spawned = spawned
    return ctx


def close_spawned(ctx):
    for coro, _ in ctx.spawned:
        coro.close()


# --- parsing -------------------------------------------------------------------------------------------

def test_parse_remediate_text_names_the_kinds_and_refuses_future_months():
    assert remediation_flow.parse_remediate_text("duplicate_charge 2026-10", date(2026, 12, 1)) == \
        ("duplicate_charge", "2026-10")
    assert remediation_flow.parse_remediate_text("wrong_tier 2026-12", date(2026, 12, 1)) == ("wrong_tier", "2026-12")
    with pytest.raises(InputError, match="unknown finding kind 'dup'.*duplicate_charge, stuck_instance"):
        remediation_flow.parse_remediate_text("dup 2026-10")
    with pytest.raises(InputError, match="malformed period '2026-13'"):
        remediation_flow.parse_remediate_text("duplicate_charge 2026-13")
    with pytest.raises(InputError, match="2027-01 is in the future"):
        remediation_flow.parse_remediate_text("duplicate_charge 2027-01", date(2026, 12, 31))
    for text in ("", "duplicate_charge", "duplicate_charge 2026-10 extra"):
        with pytest.raises(InputError, match="usage: /billing-remediate <kind> <YYYY-MM>"):
            remediation_flow.parse_remediate_text(text)


def test_parse_grouped_check_text():
    assert parse_grouped_text("customer c-acme 2026-10 T-1") == ("customer", "c-acme", ["2026-10"], "T-1")
    assert parse_grouped_text("org o-acme") == ("org", "o-acme", None, None)
    assert parse_grouped_text("Customer c-acme T-2") == ("customer", "c-acme", None, "T-2")
    with pytest.raises(InputError, match="the customer id is missing"):
        parse_grouped_text("customer")
    with pytest.raises(InputError, match="invalid org id"):
        parse_grouped_text("org <!channel>")
    with pytest.raises(InputError, match="unexpected 'x'"):
        parse_grouped_text("customer c-1 2026-10 T-1 x")


# --- the listeners: ack first, then spawn ------------------------------------------------------------

def test_billing_remediate_acks_at_once_and_spawns_the_plan():
    ctx = fake_ctx(remediation=SimpleNamespace())
    ack = AsyncMock()
    run(billing_remediate.billing_remediate(ack, {"text": "duplicate_charge 2026-10", "user_id": "U_LEAD",
                                                  "channel_id": "C1", "response_url": "https://r"}, {"bot": ctx}))
    ack.assert_awaited_once()
    assert ack.await_args.kwargs["response_type"] == "ephemeral"
    assert "duplicate_charge 2026-10" in ack.await_args.kwargs["text"]
    assert [w for _, w in ctx.spawned] == ["remediation plan duplicate_charge 2026-10"]
    close_spawned(ctx)


def test_billing_remediate_bad_input_is_answered_in_the_ack_and_nothing_runs():
    ctx = fake_ctx(remediation=SimpleNamespace())
    ack = AsyncMock()
    run(billing_remediate.billing_remediate(ack, {"text": "nope 2026-10", "user_id": "U", "channel_id": "C1"},
                                            {"bot": ctx}))
    assert ack.await_args.kwargs["response_type"] == "ephemeral"
    assert "unknown finding kind 'nope'" in ack.await_args.kwargs["text"] and "wrong_tier" in ack.await_args.kwargs["text"]
    assert ctx.spawned == []


def body(action_id, value, user="U_LEAD"):
    return {"user": {"id": user}, "channel": {"id": "C1"}, "trigger_id": "trig",
            "actions": [{"action_id": action_id, "value": str(value)}]}


def test_remediate_plan_button_spawns_the_plan_and_a_bad_value_is_told():
    ctx = fake_ctx(remediation=SimpleNamespace())
    ack = AsyncMock()
    run(batch_actions.remediate_plan(ack, body("remediate_plan", "stuck_instance 2026-10"), {"bot": ctx}))
    ack.assert_awaited_once_with()
    assert [w for _, w in ctx.spawned] == ["remediation plan stuck_instance 2026-10"]
    close_spawned(ctx)
    ctx = fake_ctx(remediation=SimpleNamespace())
    run(batch_actions.remediate_plan(AsyncMock(), body("remediate_plan", "bogus 2026-10"), {"bot": ctx}))
    assert len(ctx.spawned) == 1  # the error, told privately
    run(ctx.spawned[0][0])
    assert "unknown finding kind 'bogus'" in ctx.client.chat_postEphemeral.await_args.kwargs["text"]


def test_batch_approve_acks_then_spawns_the_approval():
    ctx = fake_ctx(remediation=SimpleNamespace())
    ack = AsyncMock()
    run(batch_actions.approve_batch(ack, body("batch_approve", 7), {"bot": ctx}))
    ack.assert_awaited_once_with()
    assert [w for _, w in ctx.spawned] == ["approval of batch-7"]
    close_spawned(ctx)


def test_batch_reject_opens_the_modal_only_for_a_planned_batch():
    plan = make_plan()
    batches = SimpleNamespace(get=AsyncMock(return_value=make_batch(plan)))
    ctx = fake_ctx(remediation=SimpleNamespace(batches=batches))
    client = AsyncMock()
    run(batch_actions.open_reject(AsyncMock(), body("batch_reject", 7), client, {"bot": ctx}))
    view = client.views_open.await_args.kwargs["view"]
    assert view["callback_id"] == "batch_reject_modal" and view["private_metadata"] == "7"
    batches.get = AsyncMock(return_value=make_batch(plan, state="approved"))
    client = AsyncMock()
    run(batch_actions.open_reject(AsyncMock(), body("batch_reject", 7), client, {"bot": ctx}))
    client.views_open.assert_not_awaited()
    assert len(ctx.spawned) == 1
    close_spawned(ctx)


def reject_view(reason, batch_id=7):
    return {"private_metadata": str(batch_id), "state": {"values": {"reason": {"value": {"value": reason}}}}}


def test_batch_reject_submission_refused_next_to_the_field_or_closes_and_updates():
    plan = make_plan()
    refused = BatchOutcome("refused", make_batch(plan), reason="U_AGENT may approve up to $50.00; approving this "
                                                               "needs level 2", needed_level=2)
    remediation = SimpleNamespace(reject=AsyncMock(return_value=refused))
    ctx = fake_ctx(remediation)
    ack = AsyncMock()
    run(batch_actions.submit_reject(ack, {"user": {"id": "U_AGENT"}}, reject_view("too much"), {"bot": ctx}))
    errors = ack.await_args.kwargs["errors"]
    assert "needs level 2" in errors["reason"] and "Level 2 (Support lead) can decide this plan" in errors["reason"]
    assert ctx.spawned == []
    done = BatchOutcome("done", make_batch(plan, state="rejected"))
    remediation.reject = AsyncMock(return_value=done)
    ack = AsyncMock()
    run(batch_actions.submit_reject(ack, {"user": {"id": "U_LEAD"}}, reject_view("not a defect"), {"bot": ctx}))
    ack.assert_awaited_once_with()
    remediation.reject.assert_awaited_once_with(7, "U_LEAD", "not a defect")
    coro, what = ctx.spawned[0]
    assert what == "rejection of batch-7"
    run(coro)
    upd = ctx.client.chat_update.await_args.kwargs
    assert "Rejected by <@U_LEAD>: not a defect" in str(upd["blocks"])
    assert not [b for b in upd["blocks"] if b["type"] == "actions"]


def test_billing_check_customer_spawns_the_grouped_check():
    ctx = fake_ctx()
    ack = AsyncMock()
    run(billing_check.billing_check(ack, {"text": "customer c-acme 2026-10", "user_id": "U", "channel_id": "C1",
                                          "trigger_id": "t"}, AsyncMock(), {"bot": ctx}))
    ack.assert_awaited_once_with()
    assert [w for _, w in ctx.spawned] == ["check of customer c-acme"]
    close_spawned(ctx)
    ctx = fake_ctx()
    ack = AsyncMock()
    run(billing_check.billing_check(ack, {"text": "org", "user_id": "U", "channel_id": "C1", "trigger_id": "t"},
                                    AsyncMock(), {"bot": ctx}))
    assert "the org id is missing" in ack.await_args.kwargs["text"] and ctx.spawned == []


# --- the flow's answers -------------------------------------------------------------------------------

def test_propose_posts_one_plan_uploads_its_csv_to_the_thread_and_tells_engineering():
    plan = make_plan()
    batch = make_batch(plan, message_ts=None)
    batches = SimpleNamespace(set_message=AsyncMock())
    remediation = SimpleNamespace(propose=AsyncMock(return_value=(batch, plan)), batches=batches)
    ctx = fake_ctx(remediation)
    ctx.config = parse_config({"channels": {"engineering": "C_ENG"}})
    run(remediation_flow.propose(ctx, kind="duplicate_charge", period="2026-10", user="U_LEAD", channel="C1"))
    posts = [c.kwargs for c in ctx.client.chat_postMessage.await_args_list]
    assert posts[0]["channel"] == "C1" and posts[0]["text"].startswith("Remediation plan batch-7: duplicate_charge 2026-10")
    batches.set_message.assert_awaited_once_with(7, "C1", "2.000001")
    up = ctx.client.files_upload_v2.await_args.kwargs
    assert up == {"channel": "C1", "thread_ts": "2.000001", "filename": "batch-7-duplicate_charge-2026-10.csv",
                  "content": plan.as_csv().encode("utf-8"), "title": "batch-7: duplicate_charge 2026-10, 3 customers"}
    assert posts[1]["channel"] == "C_ENG" and "batch-7" in posts[1]["text"] and "archives/C1" in posts[1]["text"]


def test_an_empty_plan_posts_nothing_to_remediate_without_buttons_csv_or_engineering():
    plan = make_plan(n=0)
    remediation = SimpleNamespace(propose=AsyncMock(return_value=(make_batch(plan), plan)),
                                  batches=SimpleNamespace(set_message=AsyncMock()))
    ctx = fake_ctx(remediation)
    ctx.config = parse_config({"channels": {"engineering": "C_ENG"}})
    run(remediation_flow.propose(ctx, kind="duplicate_charge", period="2026-10", user="U_LEAD", channel="C1"))
    assert ctx.client.chat_postMessage.await_count == 1
    msg = ctx.client.chat_postMessage.await_args.kwargs
    assert "Nothing to remediate" in str(msg["blocks"]) and msg["text"].endswith("nothing to remediate")
    assert not [b for b in msg["blocks"] if b["type"] == "actions"]
    ctx.client.files_upload_v2.assert_not_awaited()


def test_a_plan_where_the_bot_cannot_post_goes_to_the_requesters_dms():
    plan = make_plan()
    batches = SimpleNamespace(set_message=AsyncMock())
    ctx = fake_ctx(SimpleNamespace(propose=AsyncMock(return_value=(make_batch(plan), plan)), batches=batches))
    ctx.client.chat_postMessage.side_effect = [
        SlackApiError("no", {"ok": False, "error": "channel_not_found"}), {"channel": "DU_LEAD", "ts": "3.1"}]
    run(remediation_flow.propose(ctx, kind="duplicate_charge", period="2026-10", user="U_LEAD", channel="C_PRIV"))
    assert ctx.client.chat_postMessage.await_args.kwargs["channel"] == "U_LEAD"
    batches.set_message.assert_awaited_once_with(7, "DU_LEAD", "3.1")


def test_refused_approval_is_private_and_names_who_can_approve():
    plan = make_plan(n=30)  # $124.80: level 2
    out = BatchOutcome("refused", make_batch(plan), reason="U_AGENT may approve up to $50.00", needed_level=2)
    ctx = fake_ctx(SimpleNamespace(approve=AsyncMock(return_value=out)))
    run(remediation_flow.approve(ctx, 7, "U_AGENT", "C1"))
    eph = ctx.client.chat_postEphemeral.await_args.kwargs
    assert eph["user"] == "U_AGENT" and "$124.80 needs level 2 (Support lead): <@U_LEAD>" in eph["text"]
    ctx.client.chat_update.assert_not_awaited()
    ctx.client.chat_postMessage.assert_not_awaited()  # no escalation channel configured
    ctx = fake_ctx(SimpleNamespace(approve=AsyncMock(return_value=out)))
    ctx.config = parse_config({"levels": {2: {"users": ["U_LEAD"]}}, "channels": {"escalation": "C_ESC"}})
    run(remediation_flow.approve(ctx, 7, "U_AGENT", "C1"))
    ping = ctx.client.chat_postMessage.await_args.kwargs
    assert ping["channel"] == "C_ESC" and ping["text"].startswith("<@U_LEAD>: remediation plan batch-7")
    assert "<@U_AGENT> tried to approve it and was refused" in ping["text"] and "archives/C1" in ping["text"]


def test_a_changed_plan_replaces_the_old_message_and_posts_the_new_one():
    old_plan, new_plan = make_plan(3), make_plan(4)
    old = make_batch(old_plan, state="superseded")
    new = make_batch(new_plan, id=8, message_ts=None)
    batches = SimpleNamespace(get=AsyncMock(return_value=old), set_message=AsyncMock())
    out = BatchOutcome("changed", new, new_plan, reason="The billing data changed", needed_level=1)
    ctx = fake_ctx(SimpleNamespace(approve=AsyncMock(return_value=out), batches=batches))
    run(remediation_flow.approve(ctx, 7, "U_LEAD", "C1"))
    upd = ctx.client.chat_update.await_args.kwargs
    assert upd["ts"] == "1.000001" and "Replaced by batch-8" in str(upd["blocks"])
    assert not [b for b in upd["blocks"] if b["type"] == "actions"]
    post = ctx.client.chat_postMessage.await_args_list[0].kwargs
    assert post["channel"] == "C1" and post["text"].startswith("Remediation plan batch-8")
    batches.set_message.assert_awaited_once_with(8, "C1", "2.000001")


class FakeBatches:
    def __init__(self, batch, claim=True):
        self.batch, self.claim = batch, claim
        self.claimed, self.released, self.ts = [], 0, None
        self.lock_free = True

    def locked(self, batch_id, what="opening"):
        outer = self
        self.lock_asked = what

        class L:
            async def __aenter__(self):
                return outer.lock_free

            async def __aexit__(self, *a):
                return False
        return L()

    async def get(self, batch_id):
        return {**self.batch, "progress_ts": self.ts}

    async def claim_progress(self, batch_id, text, finished):
        self.claimed.append((text, finished))
        return self.claim

    async def release_progress(self, batch_id):
        self.released += 1

    async def set_progress_ts(self, batch_id, ts):
        self.ts = ts

    async def unfinished(self):
        return [self.batch]


def progress_of(issued=2, failed=0, customers=3):
    cases = [BatchCase(i + 1, f"c-{i:02d}", "issued", 416, 416, None, 0) for i in range(issued)]
    cases += [BatchCase(100 + i, f"c-f{i:02d}", "failed", 416, 0, "order refunded already", 1) for i in range(failed)]
    return batch_progress([c.customer_id for c in cases] + [f"c-x{i}" for i in range(customers - len(cases))], cases)


def test_the_progress_message_is_posted_once_in_the_thread_then_updated_and_released_on_failure():
    plan = make_plan()
    batches = FakeBatches(make_batch(plan, state="approved"))
    progress = progress_of(issued=2, customers=3)
    ctx = fake_ctx(SimpleNamespace(batches=batches, progress=AsyncMock(return_value=progress)))
    assert run(remediation_flow.update_progress(ctx, 7))
    post = ctx.client.chat_postMessage.await_args.kwargs
    assert post["thread_ts"] == "1.000001" and "2 of 3 issued ($8.32), 1 being opened" in post["text"]
    assert batches.ts == "2.000001" and batches.claimed[-1][1] is False
    # the next change updates that message, never a second one
    ctx.remediation.progress = AsyncMock(return_value=progress_of(issued=3, customers=3))
    assert run(remediation_flow.update_progress(ctx, 7))
    assert ctx.client.chat_postMessage.await_count == 1
    upd = ctx.client.chat_update.await_args.kwargs
    assert upd["ts"] == "2.000001" and "3 of 3 issued ($12.48)" in upd["text"] and batches.claimed[-1][1] is True
    # already said (another replica claimed it): nothing is sent
    batches.claim = False
    assert not run(remediation_flow.update_progress(ctx, 7))
    assert ctx.client.chat_update.await_count == 1
    # Slack refuses: the claim is released, so the next tick says it again
    batches.claim = True
    ctx.client.chat_update.side_effect = SlackApiError("no", {"ok": False, "error": "ratelimited"})
    with pytest.raises(SlackApiError):
        run(remediation_flow.update_progress(ctx, 7))
    assert batches.released == 1
    # another replica holds the progress lock: nothing this tick (the opening's lock is another one,
    # so the progress shows while the cases are being opened)
    batches.lock_free = False
    assert not run(remediation_flow.update_progress(ctx, 7))
    assert batches.lock_asked == "progress"


def test_the_progress_loop_survives_errors():
    plan = make_plan()
    batches = FakeBatches(make_batch(plan, state="approved"))
    remediation = SimpleNamespace(batches=batches, resume=AsyncMock(side_effect=RuntimeError("db blip")),
                                  progress=AsyncMock(side_effect=RuntimeError("db blip")))
    ctx = fake_ctx(remediation)
    assert run(remediation_flow.progress_once(ctx)) == 0  # both failures logged, the tick completes

    async def two_ticks():
        task = asyncio.create_task(remediation_flow.run_forever(ctx, 0.01))
        await asyncio.sleep(0.1)
        task.cancel()
    run(two_ticks())
    assert remediation.resume.await_count >= 3


def test_an_approved_batch_updates_the_plan_and_posts_the_progress():
    plan = make_plan()
    batches = FakeBatches(make_batch(plan, state="approved"))
    out = BatchOutcome("done", make_batch(plan, state="approved"), plan)
    ctx = fake_ctx(SimpleNamespace(approve=AsyncMock(return_value=out), batches=batches,
                                   progress=AsyncMock(return_value=progress_of(issued=0, customers=3))))
    ctx.metrics = Metrics()
    run(remediation_flow.approve(ctx, 7, "U_LEAD", "C1"))
    upd = ctx.client.chat_update.await_args.kwargs
    assert "Approved by <@U_LEAD>: 3 customers, $12.48" in str(upd["blocks"])
    assert not [b for b in upd["blocks"] if b["type"] == "actions"]
    assert ctx.client.chat_postMessage.await_args.kwargs["thread_ts"] == "1.000001"


# --- Block Kit -----------------------------------------------------------------------------------------

def test_plan_message_totals_largest_held_other_kinds_and_buttons():
    plan = make_plan(n=25, held=[("c-99", "i-99-0", 5, "pending")], other={"wrong_tier": 4})
    msg = plan_message(make_batch(plan), plan, CONFIG)
    text = str(msg["blocks"])
    assert msg["blocks"][0]["text"]["text"] == "Remediation plan batch-7: duplicate_charge 2026-10"
    for want in ("*Customers*\\n25", "*Instances*\\n50 (of 51 checked)", "*Hours*\\n50", "*Total credit*\\n$104.00",
                 "level 2 (Support lead)", "…and 15 more in the CSV", "wrong_tier (4 customers)",
                 "c-99 (i-99-0: case #5, pending)"):
        assert want in text, want
    actions = msg["blocks"][-1]
    assert [(e["action_id"], e["value"]) for e in actions["elements"]] == [("batch_approve", "7"), ("batch_reject", "7")]
    decided = plan_message(make_batch(plan), plan, CONFIG, status="Approved by <@U1>")
    assert decided["blocks"][-1]["type"] == "context" and "Approved by <@U1>" in str(decided["blocks"][-1])


def test_plan_message_escapes_customer_ids():
    plan = Plan("duplicate_charge", "2026-10", (CustomerLine("<!channel>", ("i-1",), Decimal(1), 208),), 208, {}, 1, "f",
                held=(("<@U1>", "i-2", 3, "pending"),))
    text = str(plan_message(make_batch(plan), plan, CONFIG)["blocks"])
    assert "<!channel>" not in text and "&lt;!channel&gt;" in text and "&lt;@U1&gt;" in text


def test_progress_message_lists_fifteen_failures_with_the_case_retry_button_and_stays_under_50_blocks():
    progress = progress_of(issued=10, failed=60, customers=75)
    msg = progress_message(make_batch(make_plan(), state="approved"), progress)
    assert len(msg["blocks"]) <= MAX_BLOCKS
    retries = [b["accessory"] for b in msg["blocks"] if b.get("accessory")]
    assert len(retries) == 15 and retries[0] == {"type": "button", "action_id": "case_retry", "value": "100:1",
                                                 "text": {"type": "plain_text", "text": "Retry"}}
    assert "…and 45 more failed" in msg["text"] and "order refunded already" in msg["text"]
    assert msg["text"].startswith(":warning: batch-7 (duplicate_charge 2026-10): 10 of 75 issued ($41.60)")
    assert "5 being opened, 60 failed" in msg["text"]


def test_progress_message_lists_cases_waiting_for_a_decision():
    cases = [BatchCase(1, "c-1", "issued", 416, 416, None, 0), BatchCase(2, "c-2", "pending", 9000, 0, None, 0)]
    msg = progress_message(make_batch(make_plan(), state="approved"), batch_progress(["c-1", "c-2"], cases))
    assert "1 of 2 issued ($4.16), 1 waiting for a decision" in msg["text"] and "#2 c-2 ($90.00)" in msg["text"]


def test_batch_reject_modal():
    view = batch_reject_modal({"id": 12})
    assert view["callback_id"] == "batch_reject_modal" and view["private_metadata"] == "12"
    assert view["blocks"][0]["block_id"] == "reason" and view["blocks"][0]["element"]["min_length"] == 3


def multi_report():
    def f(kind, cents, summary="s <b>"):
        return {"kind": kind, "credit_cents": cents, "hours": "1.0000", "summary": summary, "evidence": ["e <@U1>"],
                "record_ids": [1, 2]}
    return {"instance_id": None, "org_id": "o-a", "org_ids": ["o-a"], "customer_id": "c-a", "periods": ["2026-10"],
            "scope": "customer", "findings": [f("duplicate_charge", 416, "2 instances")],
            "credit_cents": 416, "required_level": 1, "systematic": True, "coverage": {"state": "complete"},
            "sources": {"database": "ok", "kubernetes": "ok", "polar": "ok"}, "credited_before": [], "notes": [],
            "systematic_reasons": [],
            "instances": [{"instance_id": "i-a", "org_id": "o-a", "credit_cents": 208, "findings": [f("duplicate_charge", 208)]},
                          {"instance_id": "i-b", "org_id": "o-a", "credit_cents": 208, "findings": [f("duplicate_charge", 208)]},
                          {"instance_id": "i-c", "org_id": "o-a", "credit_cents": 0, "findings": []}]}


def test_case_message_and_evidence_of_a_case_over_several_instances():
    case = {"id": 9, "state": "pending", "method": "refund", "report": multi_report(), "credit_cents": 416,
            "proposed_cents": 416, "required_level": 1, "systematic": False, "ticket_id": None, "requested_by": "U1",
            "decided_by": None, "reason": None, "issued_cents": None, "customer_id": "c-a"}
    msg = case_message(case, CONFIG)
    text = str(msg["blocks"])
    assert msg["blocks"][0]["text"]["text"] == "Billing case #9 · c-a (3 instances)"
    assert msg["text"].startswith("Billing case #9 for c-a (3 instances): credit $4.16")
    assert "*Instances*\\n3: i-a, i-b, i-c" in text and "*i-a* — *$2.08*" in text
    assert "No findings on 1 instance: i-c" in text and "<b>" not in text
    assert [e["action_id"] for e in msg["blocks"][-1]["elements"]][0] == "case_approve"
    ev = "".join(evidence_messages(multi_report()))
    assert "*Instance i-a* (o-a): $2.08" in ev and "*Instance i-c*" not in ev and "<@U1>" not in ev


def test_pings_systematic_report_and_letter_read_well_without_an_instance():
    from bot import slack_io
    from handlers.cases import Case as C
    row = {"id": 9, "instance_id": None, "instance_ids": ["i-a", "i-b", "i-c"], "org_id": None, "customer_id": "c-a",
           "periods": ["2026-10"], "state": "pending", "method": "refund", "report": multi_report(),
           "credit_cents": 416, "proposed_cents": 416, "required_level": 2, "systematic": True, "ticket_id": "T-1",
           "requested_by": "U1", "channel_id": "C1", "message_ts": "1.1", "issued_cents": 416}
    case = C.from_row(row)
    ctx = fake_ctx()
    ctx.config = parse_config({"levels": {2: {"users": ["U_LEAD"]}}, "channels": {"engineering": "C_ENG",
                                                                                  "escalation": "C_ESC"}})
    run(slack_io.report_systematic(ctx, case))
    text = ctx.client.chat_postMessage.await_args.kwargs["text"]
    assert "(case #9, c-a (3 instances))" in text and "None" not in text
    run(slack_io.ping_level(ctx, case, "why"))
    texts = [c.kwargs["text"] for c in ctx.client.chat_postMessage.await_args_list]
    assert all("None" not in t for t in texts) and any("case #9 for c-a (3 instances) needs level 2" in t for t in texts)
    letter = email.compose(case, {"name": "Ada", "email": "ada@example.com"}, ["r1"])
    assert "What we found for your instances i-a, i-b, i-c (October 2026 usage):" in letter.body
    assert "None" not in letter.body


def test_a_batch_cases_draft_goes_to_the_plans_thread_without_smtp():
    from bot.issuing_notifier import SlackNotifier
    from handlers.cases import Case as C
    row = {"id": 9, "instance_id": None, "instance_ids": ["i-a", "i-b"], "org_id": "o-a", "customer_id": "c-a",
           "periods": ["2026-10"], "state": "issued", "method": "refund", "report": multi_report(),
           "credit_cents": 416, "proposed_cents": 416, "required_level": 1, "ticket_id": "batch-7",
           "requested_by": "U1", "channel_id": "C1", "message_ts": None, "issued_cents": 416, "batch_id": 7,
           "decided_by": "U_LEAD"}
    case = C.from_row(row)
    store = SimpleNamespace(event=AsyncMock())
    ctx = fake_ctx(SimpleNamespace(batches=SimpleNamespace(get=AsyncMock(return_value=make_batch(make_plan())))))
    ctx.env = SimpleNamespace(smtp_url=None)
    ctx.cases = SimpleNamespace(store=store)
    run(SlackNotifier(ctx)._letter(case, ["r1"]))
    post = ctx.client.chat_postMessage.await_args.kwargs
    assert post["channel"] == "C1" and post["thread_ts"] == "1.000001"
    assert post["text"].startswith("Case #9 (c-a). Draft for the customer") and "your instances i-a, i-b" in post["text"]
    store.event.assert_awaited_once_with(9, "billing-bot", "email_drafted", {"to": None})


def test_a_plan_slack_would_not_take_is_told_to_the_requester():
    plan = make_plan()
    batch = make_batch(plan, message_ts=None)
    remediation = SimpleNamespace(propose=AsyncMock(return_value=(batch, plan)),
                                  batches=SimpleNamespace(set_message=AsyncMock()))
    ctx = fake_ctx(remediation)
    ctx.client.chat_postMessage.side_effect = SlackApiError("no", {"ok": False, "error": "invalid_blocks"})
    out = run(remediation_flow.propose(ctx, kind="duplicate_charge", period="2026-10", user="U_LEAD", channel="C1"))
    assert out is None
    told = ctx.client.chat_postEphemeral.await_args.kwargs
    assert told["user"] == "U_LEAD" and told["channel"] == "C1"
    assert f"batch-{batch['id']}" in told["text"] and "could not be posted" in told["text"]
    assert "/billing-remediate duplicate_charge 2026-10" in told["text"]
    remediation.batches.set_message.assert_not_awaited()


def test_a_plan_its_requester_cannot_approve_pings_the_level_at_once():
    from handlers.cases import authority_from_levels
    config = parse_config({"levels": {1: {"users": ["U_AGENT"]}, 2: {"users": ["U_LEAD"]}},
                           "channels": {"escalation": "C_ESC"}})

    def ctx_for(user_levels):
        plan = make_plan(n=20)  # $83.20: level 2
        batch = make_batch(plan, message_ts=None, required_level=config.required_level(plan.total_cents))
        remediation = SimpleNamespace(propose=AsyncMock(return_value=(batch, plan)),
                                      batches=SimpleNamespace(set_message=AsyncMock()))
        ctx = fake_ctx(remediation)
        ctx.config = config

        async def authority(user):
            return authority_from_levels(config, user, user_levels)
        ctx.cases = SimpleNamespace(authority=authority)
        return ctx

    agent = ctx_for((1,))
    run(remediation_flow.propose(agent, kind="duplicate_charge", period="2026-10", user="U_AGENT", channel="C1"))
    pings = [c.kwargs for c in agent.client.chat_postMessage.await_args_list if c.kwargs["channel"] == "C_ESC"]
    assert len(pings) == 1 and "<@U_LEAD>" in pings[0]["text"] and "needs level 2 (Support lead)" in pings[0]["text"]
    assert "tried to approve" not in pings[0]["text"]
    lead = ctx_for((2,))
    run(remediation_flow.propose(lead, kind="duplicate_charge", period="2026-10", user="U_LEAD", channel="C1"))
    assert not [c for c in lead.client.chat_postMessage.await_args_list if c.kwargs["channel"] == "C_ESC"]
