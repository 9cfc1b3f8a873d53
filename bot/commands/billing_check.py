"""/billing-check <instance-id> [YYYY-MM] [ticket]: ack at once, then investigate."""
from __future__ import annotations


from bot.cases_flow import open_case, parse_check_text
from bot.context import BotContext
from bot.views.check_modal import check_modal
from services.investigation import InputError


def register(app, ctx: BotContext) -> None:
    @app.command("/billing-check")
    async def billing_check(ack, command, client):
        ctx.metrics.commands.labels("billing-check").inc()
        text = (command.get("text") or "").strip()
        if not text:
            await ack()
            ctx.spawn(client.views_open(trigger_id=command["trigger_id"], view=check_modal(command.get("channel_id"))))
            return
        try:
            instance, periods, ticket = parse_check_text(text)
        except InputError as exc:  # nothing is read: the id never reaches a query
            await ack(response_type="ephemeral", text=f":warning: {exc}")
            return
        await ack()
        ctx.spawn(open_case(ctx, channel=command["channel_id"], user=command["user_id"], instance_id=instance,
                            periods=periods, ticket=ticket))
