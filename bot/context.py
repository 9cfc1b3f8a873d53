"""What every listener needs, built once by the composition root (bot/app.py `build_context`).

Listeners reach it as `context["bot"]` (a Bolt middleware puts it there), so each listener is a
plain module-level function a test can call with a mocked `ack`.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram
from slack_sdk.web.async_client import AsyncWebClient

from handlers.settings import Config
from services.approvals import GroupMembers
from services.cases import CaseService
from services.config import Env


log = logging.getLogger(__name__)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self):
        self.commands = Counter("billing_bot_commands_total", "Slash commands received", ["command"],
                                registry=self.registry)
        self.decisions = Counter("billing_bot_decisions_total", "Case decisions", ["decision"], registry=self.registry)
        self.refusals = Counter("billing_bot_refusals_total", "Decisions refused", registry=self.registry)
        self.check_seconds = Histogram("billing_bot_check_seconds", "Time to investigate a case",
                                       registry=self.registry)


@dataclass
class BotContext:
    """Listeners ack first and hand the slow part to `spawn`: the HTTP response to Slack goes out
    as soon as the listener returns (process_before_response), with no polling for the ack."""

    env: Env
    config: Config
    client: AsyncWebClient
    groups: GroupMembers
    cases: CaseService
    metrics: Metrics = field(default_factory=Metrics)
    background_limit: int = 4  # case jobs at once: acks stay fast in a burst, the DB pool is not exhausted
    _tasks: set = field(default_factory=set)
    _slots: asyncio.Semaphore | None = None

    def spawn(self, coro, what: str = "background work") -> None:
        """The one way listeners run slow work: bounded, tracked, and a failure is logged, never lost."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.background_limit)

        async def bounded():
            async with self._slots:
                return await coro
        task = asyncio.create_task(bounded())
        task.what = what
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", getattr(task, "what", "background work"), exc_info=task.exception())

    async def drain(self, timeout_s: float) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)


def ctx_of(context) -> BotContext:
    return context["bot"]
