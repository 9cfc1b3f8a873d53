"""Reject: a modal asks for the reason; one atomic pending -> rejected."""
from __future__ import annotations

from bot import slack_io
from bot.actions.approve import already_decided
from bot.context import BotContext
from services.approvals import authority_of

CALLBACK = "case_reject_modal"


def reject_modal(case: dict) -> dict:
    return {"type": "modal", "callback_id": CALLBACK, "private_metadata": str(case["id"]),
            "title": {"type": "plain_text", "text": f"Reject case #{case['id']}"},
            "submit": {"type": "plain_text", "text": "Reject"},
            "blocks": [{"type": "input", "block_id": "reason", "label": {"type": "plain_text", "text": "Reason"},
                        "element": {"type": "plain_text_input", "action_id": "value", "multiline": True,
                                    "min_length": 3}}]}


def register(app, ctx: BotContext) -> None:
    @app.action("case_reject")
    async def reject(ack, body):
        await ack()
        ctx.spawn(slack_io.open_modal_for_pending(
            ctx, body, reject_modal, lambda case: already_decided(case) if case else "No such case."))

    @app.view(CALLBACK)
    async def submitted(ack, body, view):
        case_id = int(view["private_metadata"])
        user = body["user"]["id"]
        reason = (view["state"]["values"]["reason"]["value"]["value"] or "").strip()
        case = await ctx.cases.get(case_id)
        if case is None or case["state"] != "pending":
            await ack(response_action="errors", errors={"reason": "this case is no longer waiting for a decision"})
            return
        authority = await authority_of(ctx.config, ctx.groups, user)
        if not authority.covers(case["credit_cents"]):
            await ack(response_action="errors",
                      errors={"reason": f"rejecting needs the authority to approve it (level {case['required_level']})"})
            return
        if len(reason) < 3:
            await ack(response_action="errors", errors={"reason": "say why, in a few words"})
            return
        row = await ctx.cases.transition(case_id, ("pending",), "rejected", user, "rejected", {"reason": reason},
                                         decided_by=user, reason=reason)
        await ack()

        async def announce():
            if row is None:
                await slack_io.ephemeral(ctx, case.get("channel_id"), user,
                                         already_decided(await ctx.cases.get(case_id)))
                return
            ctx.metrics.decisions.labels("rejected").inc()
            await slack_io.refresh_case_message(ctx, row)
            await slack_io.post_thread(ctx, row, f"Rejected by <@{user}>: {reason}")
        ctx.spawn(announce())
