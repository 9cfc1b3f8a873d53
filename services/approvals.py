"""Who holds which level (SPEC 3): Slack user ids from the config file, and Slack user groups read
live through `usergroups.users.list`, cached briefly. The decisions themselves are the pure
policies of handlers/cases.py."""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Awaitable, Callable

from handlers.cases import Authority, authority_from_levels
from handlers.settings import Config

GROUP_CACHE_S = 60.0  # a change in Slack takes effect within a minute
STALE_LIMIT_S = 300.0  # SPEC 3: membership may be reused at most 5 minutes while Slack is unreachable


class MembershipUnknown(Exception):
    """A user group could not be read and the last reading is too old to trust."""


class GroupMembers:
    def __init__(self, fetch: Callable[[str], Awaitable[list[str]]], ttl_s: float = GROUP_CACHE_S,
                 stale_limit_s: float = STALE_LIMIT_S, clock: Callable[[], float] = time.monotonic):
        self.fetch = fetch
        self.ttl = ttl_s
        self.stale_limit = stale_limit_s
        self.clock = clock
        self._cache: dict[str, tuple[float, list[str]]] = {}

    async def members(self, group_id: str) -> list[str]:
        hit = self._cache.get(group_id)
        now = self.clock()
        if hit and now - hit[0] < self.ttl:
            return hit[1]
        try:
            users = await self.fetch(group_id)
        except Exception as exc:
            # A Slack hiccup: the last reading beats refusing everyone, but only for a while, so a
            # lead removed from the group cannot keep approving through an outage.
            if hit and now - hit[0] < self.stale_limit:
                return hit[1]
            age = f"last read {int(now - hit[0]) // 60} min ago" if hit else "never read"
            raise MembershipUnknown(
                f"Slack could not be reached to confirm the members of user group {group_id} ({age}; "
                f"{type(exc).__name__}), so authority that depends on it cannot be confirmed. Try again shortly."
            ) from exc
        self._cache[group_id] = (now, users)
        return users


async def levels_of(config: Config, groups: GroupMembers, user: str) -> tuple[tuple[int, ...], list[MembershipUnknown]]:
    """The user's levels, and the groups that could not be read (each may or may not hold the user)."""
    out, unknown = [], []
    for lv in config.levels.values():
        if user in lv.users:
            out.append(lv.number)
            continue
        for g in lv.groups:
            try:
                if user in await groups.members(g):
                    out.append(lv.number)
                    break
            except MembershipUnknown as exc:
                unknown.append((lv.number, exc))
    return tuple(out), unknown


async def authority_of(config: Config, groups: GroupMembers, user: str) -> Authority:
    """The highest money limit among the user's levels (SPEC 3). A group that cannot be read does
    not block what the user is known to be allowed; where it could give more, the authority says
    why it could not be confirmed, and a decision above the known limit is refused with that."""
    levels, unknown = await levels_of(config, groups, user)
    known = authority_from_levels(config, user, levels)
    for number, exc in sorted(unknown, key=lambda u: -u[0]):  # name the group that matters most
        maybe = authority_from_levels(config, user, levels + (number,))
        if maybe.has_money and (not known.has_money or (known.limit is not None
                                                        and (maybe.limit is None or maybe.limit > known.limit))):
            return replace(known, unconfirmed=str(exc))
    return known


async def holders(config: Config, groups: GroupMembers, level: int) -> dict:
    """Who holds a level: its users and the members of its groups (for pings and the snapshot)."""
    lv = config.levels[level]
    members: dict[str, list[str]] = {}
    for g in lv.groups:
        try:
            members[g] = await groups.members(g)
        except Exception:
            members[g] = []
    return {"level": level, "name": lv.name, "users": list(lv.users), "groups": members}


def everyone(h: dict) -> list[str]:
    seen: list[str] = []
    for u in list(h["users"]) + [m for ms in h["groups"].values() for m in ms]:
        if u not in seen:
            seen.append(u)
    return seen
