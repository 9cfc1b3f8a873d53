"""The bot's settings as plain values: levels, limits, the rate card, names (SPEC 5.1).

Pure data with the defaults of SPEC 5.1, in one place: the YAML parser (services/config.py) fills
these from the file and the rules and decision policies read them. No I/O here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal


@dataclass(frozen=True)
class Level:
    number: int
    name: str
    limit: Decimal | None  # None: any amount (when money is true)
    money: bool
    users: tuple[str, ...]
    groups: tuple[str, ...]


@dataclass(frozen=True)
class KubernetesSettings:
    instances_namespace: str = "orzbob-instances"
    system_namespace: str = "orzbob-system"
    control_plane_deployment: str = "control-plane"
    label_instance: str = "instance-id"
    label_org: str = "org-id"
    label_tier: str = "tier"


@dataclass(frozen=True)
class PolarSettings:
    credit_method: str = "refund"
    usage_event_name: str = "compute_hours"
    api_version: str = "2026-04"


@dataclass(frozen=True)
class Throttle:
    """An org's throttle limits; None means that limit is off."""

    continuous_limit: timedelta | None
    daily_limit: timedelta | None
    idle_timeout: timedelta | None


DEFAULT_RATE_CARD = {
    "small": Decimal("0.083"),
    "medium": Decimal("0.167"),
    "large": Decimal("0.333"),
    "gpu": Decimal("2.08"),
}


@dataclass(frozen=True)
class Config:
    levels: dict[int, Level]
    four_eyes: bool = False
    remind_every: timedelta = timedelta(hours=4)
    channels: dict[str, str | None] = field(
        default_factory=lambda: {"escalation": None, "engineering": None, "alerts": None}
    )
    rate_card: dict[str, Decimal] = field(default_factory=lambda: dict(DEFAULT_RATE_CARD))
    throttle_defaults: Throttle = Throttle(timedelta(hours=8), timedelta(hours=24), timedelta(minutes=30))
    systematic_min_customers: int = 3
    kubernetes: KubernetesSettings = KubernetesSettings()
    polar: PolarSettings = PolarSettings()
    usage_tolerance_hours: Decimal = Decimal("0.1")
    exposure_window: timedelta = timedelta(days=30)  # 0: off (SPEC 3)
    bot_schema: str = "billing_bot"

    def money_levels(self) -> list[Level]:
        """Levels that carry money authority, smallest limit first, unlimited last."""
        money = [lv for lv in self.levels.values() if lv.money]
        return sorted(money, key=lambda lv: (lv.limit is None, lv.limit or 0, lv.number))

    def level_label(self, level: int) -> str:
        """'1 (Support agent)', or what level 0 means."""
        if level == 0:
            return "none (nothing to credit)"
        return f"{level} ({self.levels[level].name})"

    def required_level(self, credit_cents: int) -> int:
        """The smallest level whose limit covers the credit (SPEC 3); 0 when nothing is credited."""
        if credit_cents <= 0:
            return 0
        amount = Decimal(credit_cents) / 100
        for level in self.money_levels():
            if level.limit is None or amount <= level.limit:
                return level.number
        return max(lv.number for lv in self.money_levels())


DEFAULT_LEVELS = {
    1: {"name": "Support agent", "limit": "50.00", "money": True},
    2: {"name": "Support lead", "limit": "500.00", "money": True},
    3: {"name": "Engineering", "limit": None, "money": False},
    4: {"name": "VP Engineering", "limit": None, "money": True},
}

