"""Approve (and Approve with the other method): the service decides, the money path starts, then Slack is told."""
from __future__ import annotations

from bot import slack_io
from bot.context import ctx_of
from handlers.cases import other_method
from handlers.timeline import fmt_money


async def approve(ack, body, context) -> None:
    await ack()
    ctx = ctx_of(context)
    user, channel, case_id, _ = slack_io.button_ids(body)
    ctx.spawn(approve_case(ctx, case_id, user, channel), f"approval of case {case_id}")


async def approve_other_method(ack, body, context) -> None:
    """The approver switches the method while approving: refund <-> invoice credit (SPEC 4)."""
    await ack()
    ctx = ctx_of(context)
    user, channel, case_id, _ = slack_io.button_ids(body)
    ctx.spawn(approve_case(ctx, case_id, user, channel, switch=True), f"approval of case {case_id}")


async def approve_case(ctx, case_id: int, user: str, channel: str | None, switch: bool = False):
    method = None
    if switch:
        case = await ctx.cases.store.get(case_id)
        method = other_method(case.method) if case else None
    out = await ctx.cases.approve(case_id, user, method)
    if out.ok:
        ctx.metrics.decisions.labels("approved").inc()
        if ctx.cases.issuer is None:
            await slack_io.safely("thread", case_id, slack_io.post_thread(ctx, out.case, (
                "Polar is not configured (no POLAR_API_KEY): nothing was issued. "
                "The case stays approved until issuing is configured.")))
    await slack_io.show_outcome(ctx, out, user, channel, out.ok and (
        f"Approved by <@{user}> for {fmt_money(out.case.credit_cents)} ({out.case.method.replace('_', ' ')})."))
    return out


def register(app) -> None:
    app.action("case_approve")(approve)
    app.action("case_approve_other_method")(approve_other_method)
