"""What every listener needs, built once by the composition root (bot/app.py `build_context`).

Listeners reach it as `context["bot"]` (a Bolt middleware puts it there), so each listener is a
plain module-level function a test can call with a mocked `ack`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram
from slack_sdk.web.async_client import AsyncWebClient

from handlers.settings import Config
from services.approvals import GroupMembers
from services.background import Background
from services.cases import CaseService
from services.config import Env
from services.remediation import RemediationService


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
    remediation: RemediationService | None = None  # SPEC 5.3's batches (None only in listener unit tests)
    metrics: Metrics = field(default_factory=Metrics)
    # case jobs at once: acks stay fast in a burst, and the database pool is not exhausted
    background: Background = field(default_factory=lambda: Background(limit=4, name="listener work"))

    def spawn(self, coro, what: str = "listener work") -> None:
        """The listeners' slow part, bounded; a failure is logged with what it was."""
        self.background.spawn(coro, what)

    async def drain(self, timeout_s: float) -> None:
        await self.background.drain(timeout_s)


def ctx_of(context) -> BotContext:
    return context["bot"]
