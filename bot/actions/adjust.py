"""Adjust: a modal to lower the amount; the level is recomputed from the new amount."""
from __future__ import annotations

from decimal import Decimal, InvalidOperation

from bot import slack_io
from bot.context import BotContext
from handlers.timeline import fmt_money
from services.approvals import authority_of

CALLBACK = "case_adjust_modal"


def adjust_modal(case: dict) -> dict:
    return {"type": "modal", "callback_id": CALLBACK, "private_metadata": str(case["id"]),
            "title": {"type": "plain_text", "text": f"Adjust case #{case['id']}"},
            "submit": {"type": "plain_text", "text": "Lower the credit"},
            "blocks": [{"type": "input", "block_id": "amount",
                        "label": {"type": "plain_text", "text": f"New credit (at most {fmt_money(case['credit_cents'])})"},
                        "element": {"type": "plain_text_input", "action_id": "value",
                                    "initial_value": f"{case['credit_cents'] / 100:.2f}"}}]}


def parse_amount(text: str, current_cents: int) -> tuple[int | None, str | None]:
    raw = (text or "").strip().lstrip("$").replace(",", "")
    try:
        amount = Decimal(raw)
    except InvalidOperation:
        return None, f"not an amount: {text!r} (like 12.34)"
    if not amount.is_finite() or amount != amount.quantize(Decimal("0.01")):
        return None, "use dollars and cents, like 12.34"
    cents = int(amount * 100)
    if cents <= 0:
        return None, "the credit must be more than $0.00 (reject the case instead)"
    if cents > current_cents:
        return None, f"an adjustment can only lower the credit: at most {fmt_money(current_cents)}"
    return cents, None


def register(app, ctx: BotContext) -> None:
    @app.action("case_adjust")
    async def adjust(ack, body):
        await ack()
        ctx.spawn(slack_io.open_modal_for_pending(
            ctx, body, adjust_modal, lambda case: "This case is no longer waiting for a decision."))

    @app.view(CALLBACK)
    async def submitted(ack, body, view):
        case_id = int(view["private_metadata"])
        user = body["user"]["id"]
        case = await ctx.cases.get(case_id)
        text = view["state"]["values"]["amount"]["value"]["value"]
        if case is None or case["state"] != "pending":
            await ack(response_action="errors", errors={"amount": "this case is no longer waiting for a decision"})
            return
        authority = await authority_of(ctx.config, ctx.groups, user)
        if not authority.has_money:
            await ack(response_action="errors", errors={"amount": "only an approver (levels 1, 2 or 4) may adjust"})
            return
        cents, error = parse_amount(text, case["credit_cents"])
        if error:
            await ack(response_action="errors", errors={"amount": error})
            return
        row = await ctx.cases.adjust(case_id, cents, ctx.config.required_level(cents), user)
        if row is None:
            await ack(response_action="errors", errors={"amount": "the case changed meanwhile; reopen it"})
            return
        await ack()

        async def announce():
            await slack_io.refresh_case_message(ctx, row)
            await slack_io.post_thread(ctx, row, f"<@{user}> lowered the credit from {fmt_money(case['credit_cents'])} "
                                                 f"to {fmt_money(cents)} (needs level {row['required_level']}).")
        ctx.spawn(announce())
