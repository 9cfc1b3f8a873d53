"""The reconciliation message's "Open case" button: the /billing-check flow for that instance."""
from __future__ import annotations

from bot.cases_flow import open_case
from bot.context import BotContext


def register(app, ctx: BotContext) -> None:
    @app.action("open_case")
    async def open_from_alert(ack, body):
        await ack()
        instance, _, period = body["actions"][0]["value"].partition(" ")
        user = body["user"]["id"]
        channel = (body.get("channel") or {}).get("id") or user
        ctx.spawn(open_case(ctx, channel=channel, user=user, instance_id=instance,
                            periods=[period] if period else None, ticket=None))
