"""Re-ping the needed level every `remind_every` until someone decides.

Safe with several replicas: each tick claims the due cases (SKIP LOCKED) and pushes their next
reminder forward in one committed transaction, and only then pings anyone, so a case is pinged
once per interval whichever replica gets there first, and Slack is never called while case rows
are locked. No in-memory timers.
"""
from __future__ import annotations

import asyncio
import logging

from bot import slack_io
from bot.context import BotContext

log = logging.getLogger(__name__)


async def remind_once(ctx: BotContext) -> int:
    due = await ctx.cases.store.claim_due_reminders(ctx.config.remind_every.total_seconds())
    for case in due:
        await slack_io.safely("reminder", case.id, slack_io.ping_level(
            ctx, case, f"Reminder {case.reminders}: still waiting for a decision."))
    return len(due)


async def run_forever(ctx: BotContext, tick_s: float) -> None:
    await every(tick_s, lambda: remind_once(ctx), "reminder tick")


async def every(tick_s: float, once, what: str) -> None:
    """Run once() every tick_s for ever; a failing tick is logged and the next one tries again."""
    while True:
        try:
            await once()
        except Exception:  # keep the loop alive
            log.exception("%s failed", what)
        await asyncio.sleep(tick_s)
