"""The reconciliation message's "Open case" button: the /billing-check flow for that instance."""
from __future__ import annotations

from bot.cases_flow import open_case
from bot.context import ctx_of


async def open_from_alert(ack, body, context) -> None:
    await ack()
    ctx = ctx_of(context)
    instance, _, period = body["actions"][0]["value"].partition(" ")
    user = body["user"]["id"]
    channel = (body.get("channel") or {}).get("id") or user
    ctx.spawn(open_case(ctx, channel=channel, user=user, instance_id=instance,
                        periods=[period] if period else None, ticket=None), f"check of {instance}")


def register(app) -> None:
    app.action("open_case")(open_from_alert)
