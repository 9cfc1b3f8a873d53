"""/billing-check <instance-id> [YYYY-MM] [ticket], /billing-check customer <customer-id> ... and
/billing-check org <org-id> ...: ack at once, then investigate."""
from __future__ import annotations

from bot.blocks import check_modal, escape
from bot.cases_flow import GROUPED, open_case, open_grouped, parse_check_text, parse_grouped_text
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
    if text.split()[0].lower() in GROUPED:
        try:
            scope, scope_id, periods, ticket = parse_grouped_text(text)
        except InputError as exc:
            await ack(response_type="ephemeral", text=f":warning: {escape(exc)}")
            return
        await ack()
        ctx.spawn(open_grouped(ctx, scope=scope, scope_id=scope_id, channel=command["channel_id"],
                               user=command["user_id"], periods=periods, ticket=ticket,
                               response_url=command.get("response_url")), f"check of {scope} {scope_id}")
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
