"""A case and everything that may happen to it: its states, the one table of legal transitions, and
the decision policies of SPEC 3. All functions here are pure: data in, decision out.

The stored row becomes a `Case`; the report JSON it carries (SPEC 5) stays a dict in `Case.report`.
The case service (services/cases.py) is the only code that changes a case, always through
`TRANSITIONS`, and the database refuses any other move too (a trigger built from this table).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, Mapping

from .settings import Config
from .timeline import fmt_money

CaseState = Literal["pending", "approved", "issuing", "issued", "rejected", "failed", "expired"]
STATES: tuple[CaseState, ...] = ("pending", "approved", "issuing", "issued", "rejected", "failed", "expired")
# States whose case holds its pieces of billed time (SPEC 2.2): from opening until rejected or
# expired; issued holds them for good.
HOLDING: tuple[CaseState, ...] = ("pending", "approved", "issuing", "failed", "issued")
# A second check of the instance shows a case in one of these instead of opening another.
OPEN: tuple[CaseState, ...] = ("pending", "approved", "issuing", "failed")
METHODS = ("refund", "invoice_credit")

Action = Literal["approve", "adjust", "reject", "expire", "recheck", "start_issuing", "mark_issued",
                 "mark_failed", "retry", "switch_method"]


@dataclass(frozen=True)
class Move:
    sources: tuple[CaseState, ...]
    target: CaseState
    by: Literal["person", "bot"]
    means: str


# The one table of what may happen to a case. A person's moves also pass a policy below.
TRANSITIONS: dict[Action, Move] = {
    "approve": Move(("pending",), "approved", "person", "Approve: the money may move"),
    "adjust": Move(("pending",), "pending", "person", "lower the amount; the level is recomputed"),
    "reject": Move(("pending", "failed"), "rejected", "person", "no credit (failed: only if no money moved)"),
    "expire": Move(("pending", "approved", "issuing", "failed"), "expired", "bot",
                   "a fresh check found nothing left to credit, and no money had moved"),
    "recheck": Move(("pending", "approved", "issuing", "failed"), "pending", "bot",
                    "the evidence changed before money moved: new amount (never below what moved), decide again"),
    "start_issuing": Move(("approved",), "issuing", "bot", "a worker claims the approved case"),
    "mark_issued": Move(("issuing",), "issued", "bot", "Polar confirmed all of the money"),
    "mark_failed": Move(("approved", "issuing"), "failed", "bot", "Polar refused, or no order to refund"),
    "retry": Move(("failed",), "approved", "person", "issue the unpaid part again, same method"),
    "switch_method": Move(("failed",), "approved", "person", "issue the unpaid part by the other method"),
}


def allowed_moves() -> set[tuple[str, str]]:
    """Every (from, to) state pair the table allows; the database trigger is built from this."""
    return {(s, m.target) for m in TRANSITIONS.values() for s in m.sources}


def can(action: Action, state: str) -> bool:
    return state in TRANSITIONS[action].sources


def diagram() -> str:
    """The lifecycle as a Markdown table, generated from TRANSITIONS (docs/architecture.md embeds
    it between markers, and a test holds the two equal)."""
    lines = ["| action | from | to | by | what it means |", "|---|---|---|---|---|"]
    for action, m in TRANSITIONS.items():
        lines.append(f"| `{action}` | {', '.join(m.sources)} | {m.target} | {m.by} | {m.means} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Case:
    """A stored case. `report` is the check it was opened on (SPEC 5 JSON)."""

    id: int
    instance_id: str | None  # None for a case over several instances (instance_ids)
    org_id: str | None  # None when those instances belong to several orgs
    customer_id: str
    state: CaseState
    periods: tuple[str, ...]
    proposed_cents: int  # what the check found
    credit_cents: int  # what will be issued (an approver may lower it)
    required_level: int
    report: Mapping[str, Any]
    requested_by: str
    method: str = "refund"
    ticket_id: str | None = None
    systematic: bool = False
    kinds: tuple[str, ...] = ()
    exposure_cents: int = 0  # the customer's other recent credits that count toward the level (SPEC 3)
    fingerprint: str | None = None  # of the database evidence the amount was built on (SPEC 2.2)
    approvers: Mapping[str, Any] = field(default_factory=dict)
    channel_id: str | None = None
    message_ts: str | None = None
    response_url: str | None = None
    decided_by: str | None = None
    decided_at: datetime | None = None
    reason: str | None = None
    issued_cents: int | None = None
    remainder_cents: int = 0
    polar_reference: str | None = None
    notified: bool = False
    failures: int = 0  # how many times issuing failed; a failure's buttons carry its number
    parent_case_id: int | None = None  # a remainder's case points at the case it completes
    reminders: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None
    issued_at: datetime | None = None
    next_remind_at: datetime | None = None
    instance_ids: tuple[str, ...] = ()  # every instance whose billed time the case holds
    batch_id: int | None = None  # the remediation batch that opened it (SPEC 5.3)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Case":
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in row.items() if k in names}
        values["periods"] = tuple(values.get("periods") or ())
        values["kinds"] = tuple(values.get("kinds") or ())
        values["instance_ids"] = tuple(values.get("instance_ids") or
                                       ((values["instance_id"],) if values.get("instance_id") else ()))
        return cls(**values)

    @property
    def instances(self) -> tuple[str, ...]:
        """The instances whose billed time the case holds, sorted (the order locks are taken in)."""
        return tuple(sorted(self.instance_ids or ((self.instance_id,) if self.instance_id else ())))

    @property
    def instance_orgs(self) -> tuple[tuple[str, str], ...]:
        """(instance, org) for each instance: the evidence of each is read with its own org's
        throttle row. A case over several instances keeps them in its report."""
        if self.instance_id is not None:
            return ((self.instance_id, self.org_id or ""),)
        return tuple(sorted((i["instance_id"], i["org_id"]) for i in self.report.get("instances") or ()))

    @property
    def subject(self) -> str:
        """What the case is about, in a few words: the instance, or the customer's instances."""
        if self.instance_id is not None:
            return self.instance_id
        n = len(self.instance_ids)
        return f"{self.customer_id} ({n} instance{'s' if n != 1 else ''})"

    @property
    def deciding_cents(self) -> int:
        """The amount that decides who may decide this case: its credit plus the customer's other
        recent credits (SPEC 3, exposure)."""
        return self.credit_cents + self.exposure_cents

    def __getitem__(self, key: str):  # templates and messages read a case like the row it was
        return getattr(self, key)

    def get(self, key: str, default=None):
        return getattr(self, key, default)


@dataclass(frozen=True)
class Authority:
    """What a person may decide: the highest money limit among their levels (SPEC 3)."""

    user: str
    levels: tuple[int, ...]
    limit: Decimal | None  # None with money levels: any amount
    has_money: bool
    # Why more authority could not be confirmed (a Slack group that could not be read and could
    # give more): a refusal for authority says so, since it may be wrong.
    unconfirmed: str = ""

    def covers(self, cents: int) -> bool:
        if not self.has_money:
            return False
        return self.limit is None or Decimal(cents) / 100 <= self.limit


def authority_from_levels(config: Config, user: str, levels: tuple[int, ...]) -> Authority:
    money = [config.levels[n] for n in levels if config.levels[n].money]
    if not money:
        return Authority(user, levels, Decimal(0), False)
    unlimited = any(lv.limit is None for lv in money)
    return Authority(user, levels, None if unlimited else max(lv.limit for lv in money), True)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""  # for a person to read when refused
    needed_level: int = 0  # the level that can decide, when the refusal is for authority


ALLOWED = Decision(True)

_VERB = {"approve": "approve", "adjust": "adjust", "reject": "reject", "retry": "retry issuing",
         "switch_method": "switch the method of"}


def state_refusal(case: Case) -> str:
    who = f"<@{case.decided_by}>" if case.decided_by else "someone else"
    if case.state == "pending":
        return f"Case #{case.id} is waiting for a decision."
    if case.state in ("approved", "issuing", "issued", "rejected"):
        return f"Case #{case.id} was already decided: {case.state} by {who}."
    if case.state == "failed":
        return f"Case #{case.id} failed to issue and waits for a retry."
    return f"Case #{case.id} needs no decision (nothing to credit)."


def _decide(action: Action, case: Case, authority: Authority, config: Config) -> Decision:
    """The rules every decision shares: the state allows it, four-eyes, authority over the amount
    that decides the level (the credit plus exposure)."""
    if not can(action, case.state):
        return Decision(False, state_refusal(case))
    needed = config.required_level(case.deciding_cents)
    if config.four_eyes and authority.user == case.requested_by:
        return Decision(False, "four-eyes is on: someone other than the requester must decide this case", needed)
    if not authority.covers(case.deciding_cents):
        if authority.unconfirmed:
            return Decision(False, authority.unconfirmed, needed)
        amount = fmt_money(case.deciding_cents)
        why = (f"{amount} with the customer's other recent credits" if case.exposure_cents else amount)
        return Decision(False, f"to {_VERB[action]} this case needs authority over {why}, more than you have", needed)
    return ALLOWED


def may_approve(case: Case, authority: Authority, config: Config) -> Decision:
    return _decide("approve", case, authority, config)


def may_reject(case: Case, authority: Authority, config: Config, moved_cents: int = 0) -> Decision:
    d = _decide("reject", case, authority, config)
    if d.allowed and case.state == "failed" and moved_cents > 0:
        return Decision(False, f"{fmt_money(moved_cents)} of this case already reached the customer, or may have "
                               "(Polar confirmed it, has it pending, or never answered): retry or switch the method "
                               "for the rest instead")
    return d


def may_adjust(case: Case, authority: Authority, config: Config, new_cents: int) -> Decision:
    d = _decide("adjust", case, authority, config)
    if not d.allowed:
        return d
    if new_cents <= 0:
        return Decision(False, "the credit must be more than $0.00 (reject the case instead)")
    if new_cents > case.credit_cents:
        return Decision(False, f"an adjustment can only lower the credit: at most {fmt_money(case.credit_cents)}")
    return ALLOWED


def may_retry(case: Case, authority: Authority, config: Config, failure: int | None) -> Decision:
    if failure is not None and (case.state != "failed" or failure != case.failures):
        return Decision(False, "This is no longer current: the case has moved on since this failure.")
    return _decide("retry", case, authority, config)


def may_switch_method(case: Case, authority: Authority, config: Config, failure: int | None) -> Decision:
    if failure is not None and (case.state != "failed" or failure != case.failures):
        return Decision(False, "This is no longer current: the case has moved on since this failure.")
    return _decide("switch_method", case, authority, config)


def may_remediate(total_cents: int, requested_by: str, authority: Authority, config: Config) -> Decision:
    """One approval for a batch (SPEC 5.3): a level whose limit covers the plan's total."""
    needed = config.required_level(total_cents)
    if config.four_eyes and authority.user == requested_by:
        return Decision(False, "four-eyes is on: someone other than the requester must approve the plan", needed)
    if not authority.covers(total_cents):
        return Decision(False, f"approving the plan's {fmt_money(total_cents)} needs more authority than you have",
                        needed)
    return ALLOWED


def other_method(method: str) -> str:
    return "invoice_credit" if method == "refund" else "refund"
