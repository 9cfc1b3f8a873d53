"""Approve: authority checked against the stored amount, then one atomic pending -> approved."""
from __future__ import annotations

import logging

from bot import slack_io
from bot.context import BotContext
from handlers.timeline import fmt_money
from services.approvals import authority_of, holders, may_approve, mention_text

log = logging.getLogger(__name__)


def already_decided(case: dict) -> str:
    who = f"<@{case['decided_by']}>" if case.get("decided_by") else "someone else"
    return f"Case #{case['id']} was already decided: {case['state']} by {who}."


def register(app, ctx: BotContext) -> None:
    @app.action("case_approve")
    async def approve(ack, body):
        await ack()
        user, channel, case_id = slack_io.button_ids(body)
        ctx.spawn(approve_case(ctx, case_id, user, channel))

    @app.action("case_approve_other_method")
    async def approve_other_method(ack, body):
        """The approver switches the method: refund <-> invoice credit (SPEC 4)."""
        await ack()
        user, channel, case_id = slack_io.button_ids(body)
        case = await ctx.cases.get(case_id)
        other = "invoice_credit" if case and case["method"] == "refund" else "refund"
        ctx.spawn(approve_case(ctx, case_id, user, channel, method=other))


async def approve_case(ctx: BotContext, case_id: int, user: str, channel: str | None,
                       method: str | None = None) -> dict | None:
    case = await ctx.cases.get(case_id)
    if case is None:
        await slack_io.ephemeral(ctx, channel, user, f"Case #{case_id} does not exist.")
        return None
    if case["state"] != "pending":
        await slack_io.ephemeral(ctx, channel, user, already_decided(case))
        return None
    authority = await authority_of(ctx.config, ctx.groups, user)
    decision = may_approve(ctx.config, authority, case["credit_cents"], case["requested_by"])
    if not decision.allowed:
        ctx.metrics.refusals.inc()
        h = await holders(ctx.config, ctx.groups, case["required_level"])
        await ctx.cases.event(case_id, user, "refused", {"reason": decision.reason, "credit_cents": case["credit_cents"],
                                                          "levels": list(authority.levels)})
        log.info("case %s: approval by %s refused: %s", case_id, user, decision.reason)
        await slack_io.ephemeral(ctx, channel, user, (
            f":no_entry: {decision.reason}. {fmt_money(case['credit_cents'])} needs level {h['level']} "
            f"({h['name']}): {mention_text(h)}. They have been pinged."))
        await slack_io.ping_level(ctx, case, f"<@{user}> tried to approve it and was refused.")
        return None
    method = method or case["method"]
    row = await ctx.cases.transition(case_id, ("pending",), "approved", user, "approved",
                                     {"credit_cents": case["credit_cents"], "method": method},
                                     decided_by=user, method=method)
    if row is None:  # a concurrent click or another approver won the transition
        await slack_io.ephemeral(ctx, channel, user, already_decided(await ctx.cases.get(case_id)))
        return None
    ctx.metrics.decisions.labels("approved").inc()
    await slack_io.refresh_case_message(ctx, row)
    await slack_io.post_thread(ctx, row, f"Approved by <@{user}> for {fmt_money(row['credit_cents'])} "
                                         f"({row['method'].replace('_', ' ')}).")
    if ctx.issuer is not None:
        await ctx.issuer.submit(case_id)
    else:
        await slack_io.post_thread(ctx, row, "Polar is not configured (no POLAR_API_KEY): nothing was issued. "
                                             "The case stays approved until issuing is configured.")
    return row
