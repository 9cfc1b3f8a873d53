"""The modal /billing-check opens with no argument; bad fields are reported next to the field."""
from __future__ import annotations

from bot.cases_flow import open_case
from bot.context import BotContext
from services.investigation import InputError, validate_instance_id, validate_period

CALLBACK = "billing_check_modal"


def check_modal(channel_id: str | None) -> dict:
    def field(block_id, label, placeholder, optional):
        return {"type": "input", "block_id": block_id, "optional": optional,
                "label": {"type": "plain_text", "text": label},
                "element": {"type": "plain_text_input", "action_id": "value",
                            "placeholder": {"type": "plain_text", "text": placeholder}}}
    return {"type": "modal", "callback_id": CALLBACK, "private_metadata": channel_id or "",
            "title": {"type": "plain_text", "text": "Billing check"},
            "submit": {"type": "plain_text", "text": "Investigate"},
            "blocks": [field("instance", "Instance id", "i-7f3a", False),
                       field("period", "Billing period (optional)", "YYYY-MM, default: this and last month", True),
                       field("ticket", "Support ticket (optional)", "T-1234", True)]}


def read_fields(values: dict) -> tuple[dict, dict]:
    """(parsed, errors) from a view_submission's state values."""
    get = lambda b: ((values.get(b) or {}).get("value") or {}).get("value") or ""  # noqa: E731
    errors, parsed = {}, {}
    try:
        parsed["instance"] = validate_instance_id(get("instance"))
    except InputError as exc:
        errors["instance"] = str(exc)
    period = get("period").strip()
    if period:
        try:
            parsed["periods"] = [validate_period(period)]
        except InputError as exc:
            errors["period"] = str(exc)
    else:
        parsed["periods"] = None
    parsed["ticket"] = get("ticket").strip() or None
    return parsed, errors


def register(app, ctx: BotContext) -> None:
    @app.view(CALLBACK)
    async def submitted(ack, body, view):
        parsed, errors = read_fields(view["state"]["values"])
        if errors:
            await ack(response_action="errors", errors=errors)
            return
        await ack()
        user = body["user"]["id"]
        channel = view.get("private_metadata") or user
        ctx.spawn(open_case(ctx, channel=channel, user=user, instance_id=parsed["instance"],
                            periods=parsed["periods"], ticket=parsed["ticket"]))
