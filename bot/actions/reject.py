"""Reject: a modal asks for the reason; the service needs the same authority as approving."""
from __future__ import annotations

from bot import slack_io
from bot.blocks import escape, reject_modal
from bot.context import ctx_of
from handlers.cases import can, state_refusal

CALLBACK = "case_reject_modal"


async def open_reject(ack, body, client, context) -> None:
    await ack()
    ctx = ctx_of(context)
    user, channel, case_id, _ = slack_io.button_ids(body)
    case = await ctx.cases.store.get(case_id)
    if case is None or not can("reject", case.state):
        ctx.spawn(slack_io.ephemeral(ctx, channel, user, state_refusal(case) if case else "No such case."))
        return
    await client.views_open(trigger_id=body["trigger_id"], view=reject_modal(case))


async def submit_reject(ack, body, view, context) -> None:
    ctx = ctx_of(context)
    case_id = int(view["private_metadata"])
    user = body["user"]["id"]
    reason = (view["state"]["values"]["reason"]["value"]["value"] or "").strip()
    out = await ctx.cases.reject(case_id, user, reason)
    if not out.ok:
        why = out.reason
        if out.needed_level:
            why += f". Level {ctx.config.level_label(out.needed_level)} can decide this case"
        await ack(response_action="errors", errors={"reason": why[:2000]})
        return
    await ack()
    ctx.metrics.decisions.labels("rejected").inc()
    ctx.spawn(slack_io.show_outcome(ctx, out, user, out.case.channel_id, f"Rejected by <@{user}>: {escape(reason)}"),
              f"rejection of case {case_id}")


def register(app) -> None:
    app.action("case_reject")(open_reject)
    app.view(CALLBACK)(submit_reject)
