"""What every listener needs, built once at start."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from slack_sdk.web.async_client import AsyncWebClient

from services.approvals import GroupMembers
from services.config import Config, Env
from services.db import Database
from services.investigation import Investigator
from services.store import CaseStore


log = logging.getLogger(__name__)


class Issuer(Protocol):
    """Takes an approved case and moves the money (services/issuing.py)."""

    async def submit(self, case_id: int) -> None: ...


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self):
        self.commands = Counter("billing_bot_commands_total", "Slash commands received", ["command"],
                                registry=self.registry)
        self.decisions = Counter("billing_bot_decisions_total", "Case decisions", ["decision"], registry=self.registry)
        self.refusals = Counter("billing_bot_refusals_total", "Approvals refused for lack of authority",
                                registry=self.registry)
        self.check_seconds = Histogram("billing_bot_check_seconds", "Time to investigate a case",
                                       registry=self.registry)


@dataclass
class BotContext:
    """Listeners ack first and hand the slow part to `spawn`: the HTTP response to Slack goes out
    as soon as the listener returns (process_before_response), with no polling for the ack."""

    env: Env
    config: Config
    db: Database
    cases: CaseStore
    investigator: Investigator
    client: AsyncWebClient
    groups: GroupMembers
    issuer: Issuer | None = None
    metrics: Metrics = field(default_factory=Metrics)
    _tasks: set = field(default_factory=set)
    _slots: asyncio.Semaphore | None = None
    background_limit: int = 4  # case jobs at once: acks stay fast in a burst, the DB pool is not exhausted

    def spawn(self, coro) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.background_limit)

        async def bounded():
            async with self._slots:
                return await coro
        task = asyncio.create_task(bounded())
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background work failed", exc_info=task.exception())
