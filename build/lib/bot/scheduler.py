"""Re-ping the needed level every `remind_every` until someone decides.

Safe with several replicas: each tick claims due cases with SELECT ... FOR UPDATE SKIP LOCKED and
pushes their next reminder forward in the same transaction, so a case is pinged once per interval
whichever replica gets there first. No in-memory timers.
"""
from __future__ import annotations

import asyncio
import logging

from bot import slack_io
from bot.context import BotContext

log = logging.getLogger(__name__)


async def remind_once(ctx: BotContext) -> int:
    async def ping(case: dict) -> None:
        await slack_io.ping_level(ctx, case, f"Reminder {case['reminders'] + 1}: still waiting for a decision.")
    return await ctx.cases.claim_due_reminders(ctx.config.remind_every.total_seconds(), ping)


async def run_forever(ctx: BotContext, tick_s: float) -> None:
    while True:
        try:
            await remind_once(ctx)
        except Exception:  # keep the loop alive; the next tick retries
            log.exception("reminder tick failed")
        await asyncio.sleep(tick_s)
