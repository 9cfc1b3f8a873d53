"""Who may approve what (SPEC 3). Membership comes from the config file: Slack user ids, and Slack
user groups read live through `usergroups.users.list` (cached briefly)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Awaitable, Callable

from handlers.timeline import fmt_money
from services.config import Config, Level

GROUP_CACHE_S = 60.0


class GroupMembers:
    """Reads user groups live with a short cache, so a change in Slack takes effect within a minute."""

    def __init__(self, fetch: Callable[[str], Awaitable[list[str]]], ttl_s: float = GROUP_CACHE_S,
                 clock: Callable[[], float] = time.monotonic):
        self.fetch = fetch
        self.ttl = ttl_s
        self.clock = clock
        self._cache: dict[str, tuple[float, list[str]]] = {}

    async def members(self, group_id: str) -> list[str]:
        hit = self._cache.get(group_id)
        now = self.clock()
        if hit and now - hit[0] < self.ttl:
            return hit[1]
        try:
            users = await self.fetch(group_id)
        except Exception:
            if hit:  # Slack hiccup: the last known membership beats refusing everyone
                return hit[1]
            raise
        self._cache[group_id] = (now, users)
        return users


@dataclass(frozen=True)
class Authority:
    user: str
    levels: tuple[int, ...]
    limit: Decimal | None  # None with money levels: any amount; see has_money
    has_money: bool

    def covers(self, cents: int) -> bool:
        if not self.has_money:
            return False
        return self.limit is None or Decimal(cents) / 100 <= self.limit


async def levels_of(config: Config, groups: GroupMembers, user: str) -> tuple[int, ...]:
    out = []
    for lv in config.levels.values():
        if user in lv.users:
            out.append(lv.number)
            continue
        for g in lv.groups:
            if user in await groups.members(g):
                out.append(lv.number)
                break
    return tuple(out)


async def authority_of(config: Config, groups: GroupMembers, user: str) -> Authority:
    """The highest money limit among the user's levels (SPEC 3)."""
    levels = await levels_of(config, groups, user)
    money = [config.levels[n] for n in levels if config.levels[n].money]
    if not money:
        return Authority(user, levels, Decimal(0), False)
    unlimited = any(lv.limit is None for lv in money)
    return Authority(user, levels, None if unlimited else max(lv.limit for lv in money), True)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""


def may_approve(config: Config, authority: Authority, cents: int, requested_by: str) -> Decision:
    if config.four_eyes and authority.user == requested_by:
        return Decision(False, "four-eyes is on: someone other than the requester must approve")
    if not authority.covers(cents):
        return Decision(False, f"approving {fmt_money(cents)} needs more authority than you have")
    return Decision(True)


async def holders(config: Config, groups: GroupMembers, level: int) -> dict:
    """Who holds a level: its users and the members of its groups (for pings and the snapshot)."""
    lv: Level = config.levels[level]
    members: dict[str, list[str]] = {}
    for g in lv.groups:
        try:
            members[g] = await groups.members(g)
        except Exception:
            members[g] = []
    return {"level": level, "name": lv.name, "users": list(lv.users), "groups": members}


def mention_text(h: dict) -> str:
    parts = [f"<!subteam^{g}>" for g in h["groups"]] + [f"<@{u}>" for u in h["users"]]
    return ", ".join(parts) if parts else f"nobody is configured for level {h['level']} ({h['name']})"


def everyone(h: dict) -> list[str]:
    seen: list[str] = []
    for u in list(h["users"]) + [m for ms in h["groups"].values() for m in ms]:
        if u not in seen:
            seen.append(u)
    return seen
