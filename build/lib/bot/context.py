"""What every listener needs, built once at start."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from slack_sdk.web.async_client import AsyncWebClient

from services.approvals import GroupMembers
from services.config import Config, Env
from services.db import Database
from services.investigation import Investigator
from services.store import CaseStore


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
    env: Env
    config: Config
    db: Database
    cases: CaseStore
    investigator: Investigator
    client: AsyncWebClient
    groups: GroupMembers
    issuer: Issuer | None = None
    metrics: Metrics = field(default_factory=Metrics)
