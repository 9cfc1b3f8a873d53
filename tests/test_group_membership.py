"""SPEC 3: group membership read from Slack is reused at most 5 minutes while Slack is unreachable."""
import asyncio

import pytest

from services.approvals import GroupMembers, MembershipUnknown


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_membership_is_reused_for_at_most_five_minutes_of_outage():
    clock, calls = Clock(), []
    state = {"up": True, "members": ["U_LEAD2"]}

    async def fetch(group):
        calls.append(clock.now)
        if not state["up"]:
            raise ConnectionError("slack unreachable")
        return list(state["members"])

    groups = GroupMembers(fetch, ttl_s=60, clock=clock)

    async def go():
        assert await groups.members("S_LEADS") == ["U_LEAD2"]
        clock.now += 30
        assert await groups.members("S_LEADS") == ["U_LEAD2"] and len(calls) == 1  # cached
        state["up"] = False
        state["members"] = []  # the lead is removed from the group while Slack cannot be read
        clock.now += 240  # 4.5 min after the last reading: reused
        assert await groups.members("S_LEADS") == ["U_LEAD2"]
        clock.now += 60  # 5.5 min: refused, with the reason
        with pytest.raises(MembershipUnknown, match="could not be reached"):
            await groups.members("S_LEADS")
        clock.now += 30  # 6 min
        with pytest.raises(MembershipUnknown):
            await groups.members("S_LEADS")
        state["up"] = True  # Slack is back: the removal takes effect
        assert await groups.members("S_LEADS") == []
    asyncio.run(go())


def test_a_group_never_read_is_not_guessed():
    async def fetch(group):
        raise ConnectionError("down")

    with pytest.raises(MembershipUnknown, match="never read"):
        asyncio.run(GroupMembers(fetch).members("S_X"))
