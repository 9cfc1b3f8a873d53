"""The data the billing rules take in and give out. Plain values, no I/O."""
from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

from .settings import Throttle

from .timeline import Time, share

KINDS = ("duplicate_charge", "stuck_instance", "throttle_continuous", "throttle_daily", "wrong_tier")


@dataclass(slots=True)
class Record:
    """One row of billing_records, times in microseconds."""

    id: int
    instance_id: str
    org_id: str
    customer_id: str
    tier: str
    rate_per_hour: Decimal
    hours_used: Decimal
    total_charge: Decimal
    billing_period: str
    start: int
    end: int

    @property
    def seconds_us(self) -> int:
        return self.end - self.start


@dataclass(slots=True)
class Piece:
    """A part [start, end) of one record's interval, carrying its share of the record's charge."""

    record: Record
    start: Time
    end: Time

    @property
    def charge(self) -> Decimal:
        return share(self.record.total_charge, self.end - self.start, self.record.seconds_us)

    @property
    def duration(self) -> Time:
        return self.end - self.start


@dataclass(frozen=True)
class Instance:
    instance_id: str
    org_id: str
    customer_id: str
    tier: str
    status: str
    created_at: int | None
    started_at: int | None
    stopped_at: int | None
    last_heartbeat: int | None


@dataclass(frozen=True)
class Pod:
    name: str
    tier: str | None
    terminated_at: int | None  # earliest container state.terminated.finishedAt
    deleted_at: int | None  # metadata.deletionTimestamp
    phase: str | None = None


@dataclass(frozen=True)
class LogEvent:
    """One control-plane line the bot understands (SPEC 1.2)."""

    at: int
    kind: str  # creating, stopping, reaping, pausing, resuming, reap_failed, pause_failed, continuous_exceeded, daily_exceeded
    instance_id: str | None
    org_id: str | None
    detail: str  # tier, requester, reason, error or the limits, as the line gives it
    line: str
    pod: str = ""


@dataclass(frozen=True)
class UsageEvent:
    """One metering event from Polar, reduced to what the duplicate rule needs."""

    event_id: str
    instance_id: str
    start: int
    end: int
    record_id: int | None


@dataclass(frozen=True)
class OrgInterval:
    """A billed interval of any instance of the org, for the daily limit (record_id 0 when the
    database already merged the instance's records into one span)."""

    instance_id: str
    record_id: int
    start: int
    end: int


@dataclass(frozen=True)
class PriorCover:
    """A part of a record that an issued case already credited."""

    case_id: int
    record_id: int
    start: int
    end: int
    extra_events: int = 0  # Polar duplicate events already credited for this record


@dataclass(frozen=True)
class PriorCase:
    case_id: int
    credit_cents: int
    kinds: tuple[str, ...]
    issued_at: int | None
    state: str = "issued"  # an issued case credited the time; any other holds it until decided


@dataclass
class CheckInput:
    """What a check runs the rules on (one of the four meanings "case" used to have: this is the
    evidence; CheckResult is what the rules decided; services.investigation.CheckReport adds the
    sources and coverage; handlers.cases.Case is the stored case, whose `report` is the JSON)."""
    instance: Instance
    records: list[Record]  # all of the instance's records, any period
    periods: list[str]  # the checked billing periods, 'YYYY-MM'
    throttle: Throttle
    rate_card: dict[str, Decimal]
    pods: list[Pod] = field(default_factory=list)
    log_events: list[LogEvent] = field(default_factory=list)
    polar_events: list[UsageEvent] | None = None  # None: Polar did not answer
    org_intervals: list[OrgInterval] | None = None  # None: every day is under the daily limit
    prior_covers: list[PriorCover] = field(default_factory=list)
    prior_cases: list[PriorCase] = field(default_factory=list)
    systematic_kinds: dict[str, int] = field(default_factory=dict)  # kind -> customers in the period
    systematic_min_customers: int = 3


@dataclass
class Finding:
    kind: str
    credit_cents: int
    hours: Decimal
    summary: str
    evidence: list[str]
    record_ids: list[int]
    amount: Decimal  # unrounded, for audits

    def as_json(self) -> dict:
        from .timeline import hours_text

        return {
            "kind": self.kind,
            "credit_cents": self.credit_cents,
            "hours": hours_text(self.hours),
            "summary": self.summary,
            "evidence": self.evidence,
            "record_ids": self.record_ids,
        }


@dataclass
class Claim:
    """A piece blamed by one step, with the evidence for it and what it is worth."""

    piece: Piece
    credit: Decimal
    because: str  # a short evidence phrase for this piece


@dataclass
class CheckResult:
    instance: Instance
    periods: list[str]
    findings: list[Finding]
    credit_cents: int
    required_level: int
    systematic: bool
    systematic_reasons: list[str]
    true_tier: str
    true_tier_source: str
    notes: list[str]
    credited_before: list[dict]
    covered: list[dict]  # pieces this case credits: {record_id, start, end, kind, extra_events}
    credit_by_period: dict[str, int] = field(default_factory=dict)  # sums to credit_cents
