"""Retry a failed case, optionally switching it to invoice credit (a period not invoiced yet)."""
from __future__ import annotations

from bot import slack_io
from bot.context import BotContext
from services.approvals import authority_of


def register(app, ctx: BotContext) -> None:
    async def retry(body, method: str | None):
        user, channel, case_id = slack_io.button_ids(body)
        case = await ctx.cases.get(case_id)
        if case is None or case["state"] != "failed":
            await slack_io.ephemeral(ctx, channel, user, "This case is not waiting for a retry.")
            return
        authority = await authority_of(ctx.config, ctx.groups, user)
        if not authority.covers(case["credit_cents"]):
            await slack_io.ephemeral(ctx, channel, user,
                                     f"Retrying needs the authority to approve the case (level {case['required_level']}).")
            return
        fields = {"method": method} if method else {}
        row = await ctx.cases.transition(case_id, ("failed",), "approved", user, "retried",
                                         {"method": method or case["method"]}, **fields)
        if row is None:
            await slack_io.ephemeral(ctx, channel, user, "Someone else already retried it.")
            return
        await slack_io.post_thread(ctx, row, f"<@{user}> retried issuing ({row['method']}).")
        await slack_io.refresh_case_message(ctx, row)
        if ctx.issuer is not None:
            await ctx.issuer.submit(case_id)

    @app.action("case_retry")
    async def retry_same(ack, body):
        await ack()
        ctx.spawn(retry(body, None))

    @app.action("case_invoice_credit")
    async def retry_invoice_credit(ack, body):
        await ack()
        ctx.spawn(retry(body, "invoice_credit"))
