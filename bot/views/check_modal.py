"""The modal /billing-check opens with no argument; bad fields are reported next to the field."""
from __future__ import annotations

from bot.cases_flow import open_case
from bot.context import ctx_of
from services.inputs import InputError, validate_instance_id, validate_period, validate_ticket

CALLBACK = "billing_check_modal"


def read_fields(values: dict) -> tuple[dict, dict]:
    """(parsed, errors) from a view_submission's state values."""
    def get(block):
        return ((values.get(block) or {}).get("value") or {}).get("value") or ""
    errors, parsed = {}, {}
    for key, check in (("instance", validate_instance_id), ("ticket", validate_ticket)):
        try:
            parsed[key] = check(get(key))
        except InputError as exc:
            errors[key] = str(exc)
    period = get("period").strip()
    parsed["periods"] = None
    if period:
        try:
            parsed["periods"] = [validate_period(period)]
        except InputError as exc:
            errors["period"] = str(exc)
    return parsed, errors


async def submitted(ack, body, view, context) -> None:
    ctx = ctx_of(context)
    parsed, errors = read_fields(view["state"]["values"])
    if errors:
        await ack(response_action="errors", errors=errors)
        return
    await ack()
    user = body["user"]["id"]
    channel = view.get("private_metadata") or user
    ctx.spawn(open_case(ctx, channel=channel, user=user, instance_id=parsed["instance"],
                        periods=parsed["periods"], ticket=parsed["ticket"]), f"check of {parsed['instance']}")


def register(app) -> None:
    app.view(CALLBACK)(submitted)
