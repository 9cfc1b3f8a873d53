"""Retry a failed case, or issue its unpaid part by the other method. The buttons carry the
failure's number: pressed after the case moved on, they say so and do nothing."""
from __future__ import annotations

from bot import slack_io
from bot.context import ctx_of


async def retry(ack, body, context) -> None:
    await ack()
    ctx = ctx_of(context)
    ctx.spawn(_retry(ctx, body, switch=False), "retry")


async def switch_method(ack, body, context) -> None:
    await ack()
    ctx = ctx_of(context)
    ctx.spawn(_retry(ctx, body, switch=True), "method switch")


async def _retry(ctx, body, switch: bool):
    user, channel, case_id, failure = slack_io.button_ids(body)
    out = await ctx.cases.retry(case_id, user, failure, switch=switch)
    await slack_io.show_outcome(ctx, out, user, channel, out.ok and (
        f"<@{user}> retried issuing the unpaid part ({out.case.method.replace('_', ' ')})."))
    return out


def register(app) -> None:
    app.action("case_retry")(retry)
    app.action("case_invoice_credit")(switch_method)  # "issue the unpaid part as invoice credit"
    app.action("case_refund")(switch_method)  # "... as a refund"
