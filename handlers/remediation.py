"""The remediation plan of SPEC 5.3, from the checks of every instance billed in the period. Pure.

The checks decide (services/remediation.py runs them, held pieces already left out); this module
only adds them up: per customer, the instances with a finding of the kind, their hours and the
sum of their findings' cents (each rounded once, in its own check: never re-rounded here), the
total, and the other kinds seen on the way (listed, never credited). The fingerprint binds a later
approval to exactly these customers, instances and cents.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Iterable, Mapping

from .model import KINDS
from .timeline import fmt_money, hours_text


@dataclass(frozen=True)
class InstanceFindings:
    """One instance's check, reduced to what a plan needs: kind -> (credit_cents, hours)."""

    customer_id: str
    instance_id: str
    kinds: Mapping[str, tuple[int, Decimal]]
    # other cases holding some of this instance's time: (case id, state, kinds); the check already
    # left their pieces out, the plan says so
    held_by: tuple[tuple[int, str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class CustomerLine:
    customer_id: str
    instance_ids: tuple[str, ...]
    hours: Decimal
    credit_cents: int

    def as_json(self) -> dict:
        return {"customer_id": self.customer_id, "instance_ids": list(self.instance_ids),
                "hours": hours_text(self.hours), "credit_cents": self.credit_cents}


@dataclass(frozen=True)
class Plan:
    kind: str
    period: str
    customers: tuple[CustomerLine, ...]  # the largest credit first, then by customer id
    total_cents: int
    other_kinds: Mapping[str, int]  # kind -> customers with a finding of it (not credited here)
    instances_checked: int
    fingerprint: str
    # instances whose time of this kind other cases hold (left out): (customer, instance, case, state)
    held: tuple[tuple[str, str, int, str], ...] = ()

    @property
    def instance_count(self) -> int:
        return sum(len(c.instance_ids) for c in self.customers)

    @property
    def hours(self) -> Decimal:
        return sum((c.hours for c in self.customers), Decimal(0))

    def largest(self, n: int = 10) -> tuple[CustomerLine, ...]:
        return self.customers[:n]

    def as_json(self, required_level: int) -> dict:
        """SPEC 5.3's `remediate --json`, exactly these keys."""
        return {"kind": self.kind, "period": self.period, "customers": [c.as_json() for c in self.customers],
                "total_cents": self.total_cents, "required_level": required_level,
                "other_kinds": dict(self.other_kinds)}

    def as_csv(self) -> str:
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["customer_id", "instance_ids", "hours", "credit_cents"])
        for c in self.customers:
            w.writerow([c.customer_id, " ".join(c.instance_ids), hours_text(c.hours), c.credit_cents])
        return out.getvalue()


def build_plan(kind: str, period: str, checks: Iterable[InstanceFindings]) -> Plan:
    """Add up the instances' checks of one period into the plan for `kind`."""
    if kind not in KINDS:
        raise ValueError(f"unknown finding kind {kind!r}")
    seen: set[str] = set()
    per_customer: dict[str, list[tuple[str, int, Decimal]]] = {}
    other: dict[str, set[str]] = {}
    held: list[tuple[str, str, int, str]] = []
    checked = 0
    for c in checks:
        if c.instance_id in seen:  # a second check of one instance would credit its time twice
            raise ValueError(f"instance {c.instance_id} appears twice in the plan's checks")
        seen.add(c.instance_id)
        checked += 1
        held += [(c.customer_id, c.instance_id, case_id, state) for case_id, state, kinds in c.held_by
                 if kind in kinds]
        for k, (cents, hours) in c.kinds.items():
            if k not in KINDS:
                raise ValueError(f"unknown finding kind {k!r} in the check of {c.instance_id}")
            if cents < 0:
                raise ValueError(f"negative credit for {k} in the check of {c.instance_id}")
            if cents == 0:  # a check shows no finding of 0 cents; nothing to credit or list
                continue
            if k == kind:
                # hours as the instance's check shows them (four places): the plan's hours are then
                # the sum of what each check says, exact, whatever order the checks finish in
                shown = Decimal(hours_text(Decimal(hours)))
                per_customer.setdefault(c.customer_id, []).append((c.instance_id, cents, shown))
            else:
                other.setdefault(k, set()).add(c.customer_id)
    lines = [CustomerLine(customer_id=cust, instance_ids=tuple(sorted(i for i, _, _ in items)),
                          hours=sum((h for _, _, h in items), Decimal(0)),
                          credit_cents=sum(c for _, c, _ in items))
             for cust, items in per_customer.items()]
    lines.sort(key=lambda line: (-line.credit_cents, line.customer_id))
    total = sum(line.credit_cents for line in lines)
    return Plan(kind=kind, period=period, customers=tuple(lines), total_cents=total,
                other_kinds={k: len(other[k]) for k in KINDS if k in other}, instances_checked=checked,
                fingerprint=plan_fingerprint(kind, period, lines), held=tuple(sorted(held)))


def plan_fingerprint(kind: str, period: str, lines: Iterable[CustomerLine]) -> str:
    """A digest of what an approval of the plan would move: the kind, the period, and per customer
    its instances and cents (hours are explanation, not money). Independent of the order of the
    lines, so the same plan computed twice binds the same approval."""
    body = {"kind": kind, "period": period,
            "customers": sorted([line.customer_id, list(line.instance_ids), line.credit_cents] for line in lines)}
    return hashlib.sha256(json.dumps(body, separators=(",", ":"), sort_keys=True).encode()).hexdigest()


def plan_from_json(d: Mapping) -> Plan:
    """A stored plan (its `remediate --json` form, plus what the plan left out) read back."""
    lines = tuple(CustomerLine(c["customer_id"], tuple(c["instance_ids"]), Decimal(c["hours"]), int(c["credit_cents"]))
                  for c in d["customers"])
    return Plan(kind=d["kind"], period=d["period"], customers=lines, total_cents=int(d["total_cents"]),
                other_kinds=dict(d.get("other_kinds") or {}), instances_checked=int(d.get("instances_checked", 0)),
                fingerprint=plan_fingerprint(d["kind"], d["period"], lines),
                held=tuple(tuple(h) for h in d.get("held") or ()))


def plan_record(plan: Plan, required_level: int) -> dict:
    """What a batch stores of its plan: SPEC 5.3's JSON and what the plan left out."""
    return {**plan.as_json(required_level), "instances_checked": plan.instances_checked,
            "held": [list(h) for h in plan.held]}


# --- a batch's progress (SPEC 5.3: "issued, pending, failed with reasons") -----------------------

@dataclass(frozen=True)
class BatchCase:
    """What the progress message needs of one of the batch's cases."""

    case_id: int
    customer_id: str
    state: str
    credit_cents: int
    issued_cents: int
    reason: str | None
    failures: int
    remainder_of: int | None = None  # a remainder's case: what the customer's order could not take


@dataclass(frozen=True)
class BatchProgress:
    customers: int  # in the approved plan
    issued: int
    issued_cents: int
    issuing: int  # approved or issuing: money on its way (a refund Polar has not settled included)
    failed: tuple[BatchCase, ...]
    waiting: tuple[BatchCase, ...]  # pending: the check changed, or exposure needs a higher level
    closed: tuple[BatchCase, ...]  # rejected or expired
    not_opened: int  # customers without a case yet (the batch is still opening them)

    @property
    def done(self) -> bool:
        """Nothing of the batch will move without someone acting: each customer's case is issued,
        closed, failed (Retry) or waiting for a decision of its own."""
        return self.issuing == 0 and self.not_opened == 0

    @property
    def settled(self) -> bool:
        """Nothing of the batch can change any more: every customer's case is issued or closed. A
        failed case can still be retried and a waiting one decided: the progress message must
        keep following those, so a batch is only finished when settled."""
        return self.done and not self.failed and not self.waiting

    def headline(self) -> str:
        parts = [f"{self.issued} of {self.customers} issued ({fmt_money(self.issued_cents)})"]
        if self.issuing:
            parts.append(f"{self.issuing} issuing")
        if self.not_opened:
            parts.append(f"{self.not_opened} being opened")
        if self.failed:
            parts.append(f"{len(self.failed)} failed")
        if self.waiting:
            parts.append(f"{len(self.waiting)} waiting for a decision")
        if self.closed:
            parts.append(f"{len(self.closed)} closed")
        return ", ".join(parts)


def batch_progress(plan_customers: Iterable[str], cases: Iterable[BatchCase]) -> BatchProgress:
    """Counts are per customer's case; a remainder's case (offered as invoice credit when an order
    could not take the whole refund) is listed while it waits or failed, so the batch is not
    settled before it is decided, and its money is added to the issued total once issued."""
    customers = set(plan_customers)
    everything = sorted(cases, key=lambda c: c.case_id)
    remainders = [c for c in everything if c.remainder_of is not None]
    cases = [c for c in everything if c.remainder_of is None]
    have = {c.customer_id for c in cases}
    issued = [c for c in cases if c.state == "issued"]
    return BatchProgress(
        customers=len(customers | have), issued=len(issued),
        issued_cents=sum(c.issued_cents for c in issued + remainders if c.state == "issued"),
        issuing=sum(1 for c in everything if c.state in ("approved", "issuing")),
        failed=tuple(c for c in everything if c.state == "failed"),
        waiting=tuple(c for c in everything if c.state == "pending"),
        closed=tuple(c for c in cases if c.state in ("rejected", "expired")),
        not_opened=len(customers - have))
