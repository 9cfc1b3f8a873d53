"""Credit the remainder a capped refund left unpaid, as invoice credit (SPEC 4)."""
from __future__ import annotations

from bot import slack_io
from bot.context import ctx_of
from handlers.timeline import fmt_money


async def credit_remainder(ack, body, context) -> None:
    await ack()
    ctx = ctx_of(context)
    ctx.spawn(_credit(ctx, body), "remainder credit")


async def _credit(ctx, body):
    user, channel, case_id, _ = slack_io.button_ids(body)
    out = await ctx.cases.credit_remainder(case_id, user)
    await slack_io.show_outcome(ctx, out, user, channel, out.ok and (
        f"<@{user}> approved the remaining {fmt_money(out.case.credit_cents)} of case #{case_id} as invoice credit "
        f"(case #{out.case.id})."))
    return out


def register(app) -> None:
    app.action("case_remainder")(credit_remainder)
