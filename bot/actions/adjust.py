"""Adjust: a modal to lower the amount; the service recomputes the level with the exposure."""
from __future__ import annotations

from decimal import Decimal, InvalidOperation

from bot import slack_io
from bot.blocks import adjust_modal
from bot.context import ctx_of
from handlers.timeline import fmt_money

CALLBACK = "case_adjust_modal"
MAX_DIGITS = 10  # more than any credit: a longer number is a typo, not an amount


def parse_amount(text: str) -> tuple[int | None, str | None]:
    """Dollars and cents as a person types them: 12, 12.3, 12.34 or $12.34. Nothing else."""
    raw = (text or "").strip().removeprefix("$").strip()
    whole, dot, frac = raw.partition(".")
    if not (whole.isascii() and whole.isdigit() and (not dot or (frac.isascii() and frac.isdigit()))):
        return None, "not an amount: type dollars and cents, like 12.34"
    if len(whole) > MAX_DIGITS or len(frac) > 2:
        return None, "use dollars and cents, like 12.34"
    try:
        cents = int(Decimal(raw) * 100)
    except InvalidOperation:
        return None, "not an amount: type dollars and cents, like 12.34"
    if cents <= 0:
        return None, "the credit must be more than $0.00 (reject the case instead)"
    return cents, None


async def open_adjust(ack, body, client, context) -> None:
    """Opened at once, while Slack's trigger is valid (3 s), not behind background work."""
    await ack()
    await slack_io.open_decision_modal(ctx_of(context), client, body, "adjust", adjust_modal)


async def submit_adjust(ack, body, view, context) -> None:
    ctx = ctx_of(context)
    case_id = int(view["private_metadata"])
    user = body["user"]["id"]
    cents, error = parse_amount(view["state"]["values"]["amount"]["value"]["value"])
    if error:
        await ack(response_action="errors", errors={"amount": error})
        return
    before = await ctx.cases.store.get(case_id)
    out = await ctx.cases.adjust(case_id, user, cents)
    await slack_io.answer_submission(ctx, ack, out, "amount", user, "adjusted", out.ok and (
        f"<@{user}> lowered the credit from {fmt_money(before.credit_cents)} to {fmt_money(cents)} "
        f"(needs level {out.case.required_level})."))


def register(app) -> None:
    app.action("case_adjust")(open_adjust)
    app.view(CALLBACK)(submit_adjust)
