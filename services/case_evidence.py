"""What a case is built on, read for one instance or for several (issue 16).

A case covers one customer's billed time: one instance (`/billing-check i-…`), every instance of a
customer or of one customer within an org (`/billing-check customer|org …`), or, for a remediation
batch (SPEC 5.3), the customer's instances with a finding of one kind, crediting that kind only.
`gather` checks the instances with the rules of SPEC 2 and returns the case's JSON, the pieces it
would hold, the fingerprint of the database evidence and the other cases holding the time, read
the same way whether the case is being opened, approved, checked again or about to move money.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Iterable

from handlers.timeline import allocate
from services.investigation import CheckReport, Investigator
from services.multi_check import MultiReport, check_all, multi_report
from services.store import combine_fingerprints


@dataclass(frozen=True)
class Scope:
    """The billed time a case is about. `multi`: the case's JSON is SPEC 5's customer form
    (`instance_id` null, `instances: [...]`), even over one instance. `kind`: the one kind a
    remediation case credits (other kinds are left to their own cases)."""

    customer_id: str | None
    instances: tuple[str, ...]
    periods: tuple[str, ...]
    multi: bool = False
    kind: str | None = None
    label: str = "customer"  # the JSON's scope: customer, org or remediation
    label_id: str | None = None

    @classmethod
    def one(cls, instance_id: str, periods: Iterable[str]) -> "Scope":
        return cls(None, (instance_id,), tuple(periods))

    @classmethod
    def of_case(cls, case) -> "Scope":
        r = case.report
        return cls(case.customer_id, case.instances, tuple(case.periods), multi=case.instance_id is None,
                   kind=r.get("remediation_kind"), label=r.get("scope") or "customer",
                   label_id=r.get("scope_id"))


@dataclass
class Evidence:
    data: dict  # the case's JSON (SPEC 5)
    covered: list[dict]  # the pieces it credits
    fingerprint: str  # of the database evidence, as the store computes it for these instances
    holders: tuple[int, ...]  # other cases holding the instances' time when read
    report: CheckReport | MultiReport

    @property
    def customer_id(self) -> str:
        return self.data["customer_id"]

    @property
    def instances(self) -> tuple[str, ...]:
        if self.data.get("instance_id"):
            return (self.data["instance_id"],)
        return tuple(sorted(i["instance_id"] for i in self.data.get("instances") or ()))

    @property
    def instance_orgs(self) -> tuple[tuple[str, str], ...]:
        if self.data.get("instance_id"):
            return ((self.data["instance_id"], self.data["org_id"]),)
        return tuple(sorted((i["instance_id"], i["org_id"]) for i in self.data.get("instances") or ()))

    @property
    def credit_cents(self) -> int:
        return self.data["credit_cents"]


async def gather(inv: Investigator, scope: Scope, exclude_case: int | None = None) -> Evidence:
    if not scope.multi:
        report = await inv.check(scope.instances[0], list(scope.periods) or None, exclude_case=exclude_case)
        return Evidence(report.as_json(), list(report.result.covered), report.fingerprint, report.holders, report)
    periods = sorted(scope.periods)
    reports = await check_all(inv, sorted(scope.instances), periods, exclude_case=exclude_case)
    return evidence_of(inv, scope, periods, reports)


def evidence_of(inv: Investigator, scope: Scope, periods: list[str], reports: list[CheckReport]) -> Evidence:
    """A case over several instances from their checks (each read in its own snapshot; the
    fingerprint and the holders are compared again under the locks before the case is trusted)."""
    customers = {r.result.instance.customer_id for r in reports}
    if len(customers) > 1:
        raise ValueError(f"a case is one customer's; these instances belong to {sorted(customers)}")
    customer = scope.customer_id or next(iter(customers), None)
    if scope.kind is not None:
        reports = [_only_kind(r, scope.kind) for r in reports]
    multi = multi_report(inv, scope.label, scope.label_id or customer or "", customer, periods, reports,
                         who=f"customer {customer}")
    credit = multi.credit_cents
    data = multi.as_json()
    by_period: dict[str, Decimal] = {}
    for r in reports:
        for p, c in (r.result.credit_by_period or {}).items():
            by_period[p] = by_period.get(p, Decimal(0)) + Decimal(c)
    data["credit_by_period"] = allocate(credit, by_period) if credit and by_period else {}
    data["notes"] = [f"{r.result.instance.instance_id}: {n}" for r in reports for n in r.result.notes]
    data["credited_before"] = [c for r in reports for c in r.result.credited_before]
    data["customer"] = next((r.as_json()["customer"] for r in reports if r.customer), None)
    data["refund_room"] = None
    data["true_tiers"] = {r.result.instance.instance_id: r.result.true_tier for r in reports}
    if scope.kind is not None:
        data["remediation_kind"] = scope.kind
    covered = [p for r in reports for p in r.result.covered]
    # as the store computes it again (evidence_fingerprint_of): one instance's own, or the combination
    fingerprint = (reports[0].fingerprint if len(reports) == 1 else
                   combine_fingerprints(f"{r.result.instance.instance_id}={r.fingerprint}" for r in reports))
    holders = tuple(sorted({h for r in reports for h in r.holders}))
    return Evidence(data, covered, fingerprint, holders, multi)


def _only_kind(report: CheckReport, kind: str) -> CheckReport:
    """The check as a remediation of `kind` sees it: that kind's findings and pieces only (the
    other kinds are listed in the plan, not credited, and stay free for their own cases)."""
    r = report.result
    findings = [f for f in r.findings if f.kind == kind]
    credit = sum(f.credit_cents for f in findings)
    periods_in = sorted(r.credit_by_period or {}) or list(r.periods)
    # one period per remediation: its credit is the kind's; over several the split follows the
    # check's own, scaled to the kind's credit
    by_period = ({periods_in[0]: credit} if len(periods_in) == 1 else
                 allocate(credit, {p: Decimal(c) for p, c in r.credit_by_period.items()}) if credit else {})
    return replace(report, result=replace(r, findings=findings, credit_cents=credit,
                                          covered=[p for p in r.covered if p["kind"] == kind],
                                          credit_by_period=by_period if credit else {}))
