"""The remediation plan of SPEC 5.3 (read-only): check every instance billed in the period with the
rules of SPEC 2, each as its own check would (pieces other cases hold left out by the check), and
add the findings of one kind up per customer (handlers/remediation.py).

Nothing here moves money or writes: issuing a batch, its approval and its progress come later.
"""
from __future__ import annotations

from handlers.remediation import InstanceFindings, Plan, build_plan
from services.investigation import CheckReport, Investigator
from services.inputs import validate_kind, validate_period
from services.multi_check import check_all, instances_billed


def findings_of(report: CheckReport) -> InstanceFindings:
    r = report.result
    return InstanceFindings(customer_id=r.instance.customer_id, instance_id=r.instance.instance_id,
                            kinds={f.kind: (f.credit_cents, f.hours) for f in r.findings},
                            held_by=tuple((c["case_id"], c["state"], tuple(c["kinds"])) for c in r.credited_before))


async def plan_remediation(inv: Investigator, kind: str, period: str) -> Plan:
    kind = validate_kind(kind)
    period = validate_period(period)
    collected: list[InstanceFindings] = []

    def keep(report: CheckReport) -> None:  # the reduced form only: a big period has many instances
        collected.append(findings_of(report))

    await check_all(inv, await instances_billed(inv.db, [period]), [period], on_report=keep)
    return build_plan(kind, period, collected)
