"""Attacks on authority (SPEC 3): four-eyes, splitting a credit into several cases, an agent one
cent short, Adjust then Approve alone. Driven through the real CaseService on the test database."""
import asyncio

from handlers.cases import authority_from_levels
from services.cases import CaseService, CheckRequest
from services.config import parse_config
from services.db import Database
from services.investigation import Investigator
from services.store import CaseStore

from .seed import instance, record

LEVELS = {1: {"users": ["U1", "U2"]}, 2: {"users": ["U_LEAD", "U_LEAD2"]}, 4: {"users": ["U_VP"]}}


def run(coro):
    return asyncio.run(coro)


def svc(db, config):
    async def authority(user):
        return authority_from_levels(config, user, tuple(n for n, lv in config.levels.items() if user in lv.users))
    return CaseService(CaseStore(db), Investigator(config, db), config, authority)


async def world(db_url, config):
    db = await Database.connect(db_url)
    s = svc(db, config)
    await s.store.migrate()
    return db, s


def seed_two_instances(conn):
    """One customer, two instances; each has a duplicate 13-hour record in October and one in
    September: every case alone is under $50, any two together are over."""
    for n, iid in enumerate(("i-aaaa", "i-bbbb")):
        instance(conn, iid, tier="gpu")
        base = 100 * (n + 1)
        for k, (day, period) in enumerate((("2026-10-05", "2026-10"), ("2026-09-05", "2026-09"))):
            record(conn, base + 2 * k, iid, f"{day} 00:00", f"{day} 13:00", "27.04", period=period)
            record(conn, base + 2 * k + 1, iid, f"{day} 00:00", f"{day} 13:00", "27.04", period=period)


def test_four_eyes_requester_who_could_approve_gets_the_others_pinged(db, db_url):
    """SPEC 3: with four-eyes on, "a requester who could approve is not an approver of their own
    case: the other holders of the level are pinged as for any case". CaseService.open sets reminders
    (and bot/cases_flow.py pings) only when the requester's authority does not cover the amount; it
    ignores four-eyes, so a lead's own case waits silently: nobody is pinged, no reminder is due."""
    seed_two_instances(db)
    config = parse_config({"levels": LEVELS, "four_eyes": True})

    async def go():
        pool, s = await world(db_url, config)
        try:
            out = await s.open(CheckRequest("i-aaaa", ["2026-10"], "U_LEAD", "T-1"))
            refused = await s.approve(out.case.id, "U_LEAD")
            return out.case, refused
        finally:
            await pool.close()

    case, refused = run(go())
    assert 0 < case.credit_cents <= 5000 and not refused.ok  # the lead may not approve their own case
    assert case.next_remind_at is not None, "nobody else is pinged or reminded about the lead's own case"


def test_an_agent_cannot_split_a_credit_across_instances_and_periods(db, db_url):
    """Regression: every case under $50 alone, the customer's total over $50: an agent approves
    none of them alone, in any order, and cannot Adjust or Reject them either."""
    seed_two_instances(db)
    config = parse_config({"levels": LEVELS})

    async def go():
        pool, s = await world(db_url, config)
        try:
            cases = [(await s.open(CheckRequest(i, [p], "U1", "T-1"))).case
                     for i, p in (("i-aaaa", "2026-10"), ("i-bbbb", "2026-10"), ("i-aaaa", "2026-09"))]
            tries = []
            for c in cases + cases[::-1]:
                tries.append(await s.approve(c.id, "U2"))
                tries.append(await s.adjust(c.id, "U2", 1))
            return cases, tries
        finally:
            await pool.close()

    cases, tries = run(go())
    assert all(0 < c.credit_cents <= 5000 for c in cases), [c.credit_cents for c in cases]
    assert sum(c.credit_cents for c in cases) > 5000
    assert [t.status for t in tries] == ["refused"] * len(tries), [(t.status, t.reason) for t in tries]
    assert all(t.needed_level == 2 for t in tries), [t.needed_level for t in tries]


def test_an_agent_one_cent_short_is_refused_and_the_lead_is_not(db, db_url):
    seed_two_instances(db)
    config = parse_config({"levels": LEVELS})

    async def go():
        pool, s = await world(db_url, config)
        try:
            c = (await s.open(CheckRequest("i-aaaa", ["2026-10"], "U1", "T-1"))).case
            async with s.store.locked(c.customer_id, c.instance_id) as tx:
                await tx.conn.execute("UPDATE billing_bot.cases SET credit_cents = 5001, required_level = 2 WHERE id = %s",
                                      (c.id,))
            agent = await s.approve(c.id, "U1")
            lead = await s.approve(c.id, "U_LEAD")
            return agent, lead
        finally:
            await pool.close()

    agent, lead = run(go())
    assert agent.status == "refused" and agent.needed_level == 2, agent
    assert lead.ok, lead


def test_an_unreadable_higher_group_does_not_block_an_approval_that_does_not_depend_on_it(db, db_url):
    """SPEC 3: while Slack cannot be reached (beyond 5 minutes) "an approval that depends on it is
    refused". Here the agent U1 is a level-1 member by user id and approves a $27.04 case, within
    level 1's $50. Level 2 is a Slack user group that cannot be read. services/approvals.authority_of
    raises MembershipUnknown whenever an unreadable group *could* give the user more authority,
    whatever the amount at stake, so the agent is refused: during a Slack outage no agent or lead
    listed by id can approve anything while a higher level is a group."""
    from services.approvals import GroupMembers, authority_of

    seed_two_instances(db)
    config = parse_config({"levels": {1: {"users": ["U1", "U2"]}, 2: {"groups": ["S_LEADS"]},
                                      4: {"users": ["U_VP"]}}})

    async def unreachable(group_id):
        raise ConnectionError("slack.com unreachable")

    groups = GroupMembers(unreachable)

    async def go():
        db_ = await Database.connect(db_url)
        s = CaseService(CaseStore(db_), Investigator(config, db_), config, lambda u: authority_of(config, groups, u))
        await s.store.migrate()
        try:
            c = (await s.open(CheckRequest("i-aaaa", ["2026-10"], "U1", "T-1"))).case
            return c, await s.approve(c.id, "U2")
        finally:
            await db_.close()

    case, out = run(go())
    assert 0 < case.credit_cents <= 5000
    assert out.ok, f"refused: {out.reason}"
