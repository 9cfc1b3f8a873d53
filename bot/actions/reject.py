"""Reject: a modal asks for the reason; the service needs the same authority as approving."""
from __future__ import annotations

from bot import slack_io
from bot.blocks import escape, reject_modal
from bot.context import ctx_of

CALLBACK = "case_reject_modal"


async def open_reject(ack, body, client, context) -> None:
    await ack()
    await slack_io.open_decision_modal(ctx_of(context), client, body, "reject", reject_modal)


async def submit_reject(ack, body, view, context) -> None:
    ctx = ctx_of(context)
    case_id = int(view["private_metadata"])
    user = body["user"]["id"]
    reason = (view["state"]["values"]["reason"]["value"]["value"] or "").strip()
    out = await ctx.cases.reject(case_id, user, reason)
    await slack_io.answer_submission(ctx, ack, out, "reason", user, "rejected",
                                     f"Rejected by <@{user}>: {escape(reason)}")


def register(app) -> None:
    app.action("case_reject")(open_reject)
    app.view(CALLBACK)(submit_reject)
