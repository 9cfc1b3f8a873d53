"""/billing-check <instance-id> [YYYY-MM] [ticket]: ack at once, then investigate."""
from __future__ import annotations

from bot.blocks import check_modal, escape
from bot.cases_flow import open_case, parse_check_text
from bot.context import ctx_of
from services.inputs import InputError


async def billing_check(ack, command, client, context) -> None:
    ctx = ctx_of(context)
    ctx.metrics.commands.labels("billing-check").inc()
    text = (command.get("text") or "").strip()
    if not text:  # the form opens at once, while Slack's trigger is valid
        await ack()
        await client.views_open(trigger_id=command["trigger_id"], view=check_modal(command.get("channel_id")))
        return
    try:
        instance, periods, ticket = parse_check_text(text)
    except InputError as exc:  # nothing is read: the id never reaches a query
        await ack(response_type="ephemeral", text=f":warning: {escape(exc)}")
        return
    await ack()
    ctx.spawn(open_case(ctx, channel=command["channel_id"], user=command["user_id"], instance_id=instance,
                        periods=periods, ticket=ticket, response_url=command.get("response_url")),
              f"check of {instance}")


def register(app) -> None:
    app.command("/billing-check")(billing_check)
