"""/billing-report [week|month]: the credits review, posted privately to whoever asked."""
from __future__ import annotations

from datetime import datetime, timezone

from bot.context import BotContext
from services.credits_report import credits_report, since_for


def register(app, ctx: BotContext) -> None:
    @app.command("/billing-report")
    async def billing_report(ack, command, client):
        ctx.metrics.commands.labels("billing-report").inc()
        span = (command.get("text") or "week").strip().lower() or "week"
        if span not in ("week", "month"):
            await ack(response_type="ephemeral", text=f":warning: unknown span {span!r}: use week or month")
            return
        await ack()

        async def answer():
            report = await credits_report(ctx.db, since_for(span, datetime.now(timezone.utc).date()))
            await client.chat_postEphemeral(channel=command["channel_id"], user=command["user_id"],
                                            text=f"```{report.as_text()[:2900]}```")
        ctx.spawn(answer())
