"""The decision policies of SPEC 3 as a table: users x levels x amounts x states x four-eyes x
exposure, for every decision. Pure: no database, no Slack."""
import itertools
from decimal import Decimal

import pytest

from handlers.cases import (
    STATES, TRANSITIONS, Case, authority_from_levels, can, may_adjust, may_approve, may_reject, may_remediate,
    may_retry, may_switch_method,
)
from services.config import parse_config

USERS = {"agent": (1,), "lead": (2,), "eng": (3,), "vp": (4,), "nobody": (), "agent+eng": (1, 3)}
LIMITS = {"agent": Decimal("50.00"), "lead": Decimal("500.00"), "vp": None, "agent+eng": Decimal("50.00")}
AMOUNTS = [1, 4999, 5000, 5001, 50000, 50001, 10_000_000]  # cents, at and around each bound


def config(four_eyes: bool):
    return parse_config({"four_eyes": four_eyes})


def case(state="pending", cents=1028, exposure=0, requested_by="requester", failures=0) -> Case:
    return Case(id=7, instance_id="i-7f3a", org_id="o", customer_id="c", state=state, periods=("2026-10",),
                proposed_cents=cents, credit_cents=cents, required_level=1, report={"findings": []},
                requested_by=requested_by, exposure_cents=exposure, failures=failures)


def expected(user: str, requester: str, state: str, action: str, deciding: int, four_eyes: bool) -> bool:
    """SPEC 3 read directly: the state allows the action; four-eyes keeps the requester out; the
    user's highest money limit covers the credit plus the exposure (bounds inclusive)."""
    if state not in TRANSITIONS[action].sources:
        return False
    if four_eyes and user == requester:
        return False
    if user not in LIMITS:
        return False
    limit = LIMITS[user]
    return limit is None or Decimal(deciding) / 100 <= limit


POLICIES = {
    "approve": lambda c, a, cfg: may_approve(c, a, cfg),
    "reject": lambda c, a, cfg: may_reject(c, a, cfg),
    "adjust": lambda c, a, cfg: may_adjust(c, a, cfg, 1),  # lowering to one cent: always a valid amount
    "retry": lambda c, a, cfg: may_retry(c, a, cfg, None),
    "switch_method": lambda c, a, cfg: may_switch_method(c, a, cfg, None),
}


@pytest.mark.parametrize("four_eyes", [False, True])
@pytest.mark.parametrize("action", sorted(POLICIES))
def test_every_decision_by_every_level_on_every_amount_and_state(action, four_eyes):
    cfg = config(four_eyes)
    rows = 0
    for (user, levels), cents, exposure, state, requester in itertools.product(
            USERS.items(), AMOUNTS, (0, 4000, 45000), STATES, ("requester", "lead")):
        c = case(state, cents, exposure, requester)
        auth = authority_from_levels(cfg, user, levels)
        got = POLICIES[action](c, auth, cfg)
        want = expected(user, requester, state, action, cents + exposure, four_eyes)
        assert got.allowed == want, (action, user, cents, exposure, state, requester, got)
        if not got.allowed:
            assert got.reason, "a refusal always says why"
        rows += 1
    assert rows == len(USERS) * len(AMOUNTS) * 3 * len(STATES) * 2


def test_an_agent_cannot_lower_a_lead_case_nor_reject_it():
    cfg = config(False)
    agent = authority_from_levels(cfg, "U_AGENT", (1,))
    big = case(cents=50000)
    d = may_adjust(big, agent, cfg, 1)
    assert not d.allowed and d.needed_level == 2 and "$500.00" in d.reason
    assert not may_reject(big, agent, cfg).allowed
    assert may_adjust(case(cents=4000), agent, cfg, 1).allowed


def test_exposure_raises_the_needed_level_and_says_so():
    cfg = config(False)
    agent = authority_from_levels(cfg, "U_AGENT", (1,))
    split = case(cents=3000, exposure=3000)  # two $30 cases for one customer: $60 decides the level
    d = may_approve(split, agent, cfg)
    assert not d.allowed and d.needed_level == 2 and "other recent credits" in d.reason


def test_adjust_amount_rules():
    cfg = config(False)
    lead = authority_from_levels(cfg, "U_LEAD", (2,))
    c = case(cents=1000)
    assert not may_adjust(c, lead, cfg, 0).allowed
    assert "only lower" in may_adjust(c, lead, cfg, 1001).reason
    assert may_adjust(c, lead, cfg, 1000).allowed


def test_reject_after_money_moved_is_refused():
    cfg = config(False)
    lead = authority_from_levels(cfg, "U_LEAD", (2,))
    failed = case("failed")
    assert may_reject(failed, lead, cfg, moved_cents=0).allowed
    d = may_reject(failed, lead, cfg, moved_cents=8)
    assert not d.allowed and "already reached the customer" in d.reason


def test_buttons_of_an_old_failure_are_no_longer_current():
    cfg = config(False)
    lead = authority_from_levels(cfg, "U_LEAD", (2,))
    now = case("failed", failures=2)
    assert may_retry(now, lead, cfg, 2).allowed
    for old in (may_retry(now, lead, cfg, 1), may_switch_method(now, lead, cfg, 1),
                may_retry(case("issued", failures=2), lead, cfg, 2)):
        assert not old.allowed and "no longer current" in old.reason


def test_engineering_alone_has_no_money_authority_and_remediation_needs_the_total():
    cfg = config(True)
    eng = authority_from_levels(cfg, "U_ENG", (3,))
    assert not eng.has_money and not may_approve(case(cents=1), eng, cfg).allowed
    lead = authority_from_levels(cfg, "U_LEAD", (2,))
    assert may_remediate(50000, "U_OTHER", lead, cfg).allowed
    assert not may_remediate(50001, "U_OTHER", lead, cfg).allowed
    assert not may_remediate(100, "U_LEAD", lead, cfg).allowed  # four-eyes on the plan's requester


def test_the_transition_table_is_closed_and_every_state_is_named():
    targets = {m.target for m in TRANSITIONS.values()}
    sources = {s for m in TRANSITIONS.values() for s in m.sources}
    assert targets | sources <= set(STATES)
    assert not any(can(a, "issued") for a in TRANSITIONS), "an issued case is final"
    assert not any(can(a, s) for a in TRANSITIONS for s in ("rejected", "expired"))


def test_the_architecture_doc_shows_the_transition_table_of_the_code():
    from pathlib import Path

    from handlers.cases import diagram

    doc = (Path(__file__).resolve().parent.parent / "docs" / "architecture.md").read_text()
    embedded = doc.split("<!-- transitions:begin -->\n", 1)[1].split("\n<!-- transitions:end -->", 1)[0]
    assert embedded == diagram()
