"""/billing-report [week|month]: the credits review, posted privately to whoever asked."""
from __future__ import annotations

from datetime import datetime, timezone

from bot.blocks import escape
from bot.context import ctx_of
from services.credits_report import credits_report, since_for


async def billing_report(ack, command, client, context) -> None:
    ctx = ctx_of(context)
    ctx.metrics.commands.labels("billing-report").inc()
    span = (command.get("text") or "week").strip().lower() or "week"
    if span not in ("week", "month"):
        await ack(response_type="ephemeral", text=f":warning: unknown span {escape(span)!r}: use week or month")
        return
    await ack()

    async def answer():
        report = await credits_report(ctx.cases.store, since_for(span, datetime.now(timezone.utc).date()))
        await client.chat_postEphemeral(channel=command["channel_id"], user=command["user_id"],
                                        text=f"```{report.as_text()[:2900]}```")
    ctx.spawn(answer(), "credits report")


def register(app) -> None:
    app.command("/billing-report")(billing_report)
