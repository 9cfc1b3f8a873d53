"""Remediating a systematic defect (SPEC 5.3): the plan, its one approval, and the batch of cases.

- `plan_remediation`: check every instance billed in the period with the rules of SPEC 2, each
  as its own check would (pieces other cases hold left out), and add the findings of one kind up
  per customer (handlers/remediation.py). Read-only.
- `RemediationService.propose`: the plan stored as a batch, bound to its fingerprint.
- `approve`: one decision by a level covering the total. The plan is computed again first: if it
  changed, the batch is superseded by a new plan and nothing is approved. Otherwise the batch is
  approved (one conditional UPDATE) and each customer's case is opened from that very check and
  approved in the same transaction (services/cases.py: the customer's and instances' locks, the
  evidence verified, the policy asked with the case's own exposure), then handed to the issuer,
  which moves each case's money exactly once (SPEC 4) with bounded workers.
- `resume`: a crash while the cases were being opened leaves the batch approved with customers
  missing; every replica's sweeper opens them (the unique (batch, customer) index and a session
  lock per batch make that once), and the issuer's own sweeper finishes the money.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from typing import Literal

from handlers.cases import Authority, Case, authority_from_levels, may_remediate
from handlers.remediation import (
    BatchCase, BatchProgress, InstanceFindings, Plan, batch_progress, build_plan, plan_from_json, plan_record,
)
from services.approvals import MembershipUnknown
from services.case_evidence import Evidence, Scope, evidence_of, gather
from services.cases import CaseService, CheckRequest
from services.investigation import CheckReport, Investigator
from services.inputs import validate_kind, validate_period
from services.multi_check import check_all, instances_billed
from services.store import Batches, Watchlist

log = logging.getLogger(__name__)
OPENING_AT_ONCE = 4  # customers' cases opened at once (each takes a pool connection under its locks)


def findings_of(report: CheckReport) -> InstanceFindings:
    r = report.result
    return InstanceFindings(customer_id=r.instance.customer_id, instance_id=r.instance.instance_id,
                            kinds={f.kind: (f.credit_cents, f.hours) for f in r.findings},
                            held_by=tuple((c["case_id"], c["state"], tuple(c["kinds"])) for c in r.credited_before))


async def plan_remediation(inv: Investigator, kind: str, period: str) -> Plan:
    return (await plan_with_checks(inv, kind, period, keep=False))[0]


async def plan_with_checks(inv: Investigator, kind: str, period: str, *, keep: bool = True
                           ) -> tuple[Plan, dict[str, list[CheckReport]]]:
    """The plan, and with keep the checks of the instances with a finding of the kind, by
    customer (what their cases are opened from; the others are reduced and dropped at once)."""
    kind = validate_kind(kind)
    period = validate_period(period)
    collected: list[InstanceFindings] = []
    kept: dict[str, list[CheckReport]] = {}

    def one(report: CheckReport) -> None:  # the reduced form only: a big period has many instances
        f = findings_of(report)
        collected.append(f)
        if keep and f.kinds.get(kind, (0, 0))[0] > 0:
            kept.setdefault(f.customer_id, []).append(report)

    # A plan shown for approval needs no fingerprints (nothing is opened on it: the approval
    # computes it again, with them, and opens the cases from that); the approval's does. Neither
    # reads Polar's customers: a batch case's letter looks its customer up when it is written
    # (bot/issuing_notifier.py), after the money moved, not 2,000 of them before the first refund.
    await check_all(inv, await instances_billed(inv.db, [period]), [period], on_report=one, fingerprint=keep,
                    read_customer=False)
    return build_plan(kind, period, collected), kept


@dataclass(frozen=True)
class BatchOutcome:
    """What a request on a batch did. changed: the plan changed; `batch` is the new plan to decide."""

    status: Literal["done", "refused", "changed", "missing"]
    batch: dict | None = None
    plan: Plan | None = None
    reason: str = ""
    needed_level: int = 0
    cases: tuple[Case, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return self.status == "done"


def batch_ticket(batch_id: int) -> str:
    """The batch's name, and the ticket_id of each of its corrections rows (SPEC 5.3)."""
    return f"batch-{batch_id}"


class RemediationService:
    def __init__(self, cases: CaseService, batches: Batches, watchlist: Watchlist | None = None):
        self.cases = cases
        self.batches = batches
        self.watchlist = watchlist

    @property
    def config(self):
        return self.cases.config

    @property
    def investigator(self) -> Investigator:
        return self.cases.investigator

    async def plan(self, kind: str, period: str) -> Plan:
        return await plan_remediation(self.investigator, kind, period)

    async def propose(self, kind: str, period: str, user: str, channel_id: str | None = None
                      ) -> tuple[dict, Plan]:
        plan = await self.plan(kind, period)
        return await self._store(plan, user, channel_id), plan

    async def _store(self, plan: Plan, user: str, channel_id: str | None) -> dict:
        level = self.config.required_level(plan.total_cents)
        batch = await self.batches.insert(kind=plan.kind, period=plan.period, fingerprint=plan.fingerprint,
                                          total_cents=plan.total_cents, required_level=level,
                                          plan=plan_record(plan, level), requested_by=user, channel_id=channel_id)
        log.info("%s planned by %s: %s %s, %s customers, %s cents, level %s", batch_ticket(batch["id"]), user,
                 plan.kind, plan.period, len(plan.customers), plan.total_cents, level)
        return batch

    async def approve(self, batch_id: int, user: str) -> BatchOutcome:
        batch = await self.batches.get(batch_id)
        if batch is None:
            return BatchOutcome("missing", reason=f"Batch {batch_id} does not exist.")
        if batch["state"] != "planned":
            return BatchOutcome("refused", batch, reason=_state_text(batch))
        try:
            authority = await self.cases.authority(user)
        except MembershipUnknown as exc:
            log.info("%s: approval by %s refused: %s", batch_ticket(batch_id), user, exc)
            return BatchOutcome("refused", batch, reason=str(exc), needed_level=batch["required_level"])
        decision = may_remediate(batch["total_cents"], batch["requested_by"], authority, self.config)
        if not decision.allowed:
            log.info("%s: approval by %s refused: %s", batch_ticket(batch_id), user, decision.reason)
            return BatchOutcome("refused", batch, reason=decision.reason + (
                f" ({authority.unconfirmed})" if authority.unconfirmed else ""), needed_level=decision.needed_level)
        if not batch["plan"]["customers"]:
            return BatchOutcome("refused", batch, reason="the plan credits nobody: there is nothing to approve")
        # The plan must still be what the approver saw: computed again, compared by fingerprint.
        plan, kept = await plan_with_checks(self.investigator, batch["kind"], batch["period"])
        if plan.fingerprint != batch["fingerprint"]:
            new = await self._store(plan, batch["requested_by"], batch["channel_id"])
            if await self.batches.supersede(batch_id, new["id"]) is None:
                return await self._refused_as_it_is(batch_id)
            log.info("%s: the data changed before the approval; superseded by %s", batch_ticket(batch_id),
                     batch_ticket(new["id"]))
            return BatchOutcome("changed", new, plan, reason=(
                "The billing data changed since this plan was made: it was computed again and needs a new "
                f"approval ({batch_ticket(new['id'])})."), needed_level=new["required_level"])
        approved = await self.batches.approve(batch_id, batch["fingerprint"], user, authority.levels)
        if approved is None:
            return await self._refused_as_it_is(batch_id)
        log.info("%s approved by %s: %s customers, %s cents", batch_ticket(batch_id), user, len(plan.customers),
                 plan.total_cents)
        await self._watch(approved, plan.customers)
        async with self.batches.locked(batch_id) as mine:  # the sweepers leave a batch being opened alone
            # A sweeper that took the lock first (the approval committed, its resume() saw it) opens
            # the cases itself, from the stored plan: opening them here too would be safe (one case
            # per batch and customer, claimed under the customer's lock) but is work done twice.
            cases = await self._open_all(approved, plan, kept, authority) if mine else []
        return BatchOutcome("done", approved, plan, cases=tuple(cases))

    async def reject(self, batch_id: int, user: str, reason: str) -> BatchOutcome:
        reason = reason.strip()
        if len(reason) < 3:
            return BatchOutcome("refused", reason="say why, in a few words")
        batch = await self.batches.get(batch_id)
        if batch is None:
            return BatchOutcome("missing", reason=f"Batch {batch_id} does not exist.")
        try:
            authority = await self.cases.authority(user)
        except MembershipUnknown as exc:
            return BatchOutcome("refused", batch, reason=str(exc))
        decision = may_remediate(batch["total_cents"], batch["requested_by"], authority, self.config)
        if not decision.allowed:  # rejecting decides the plan as much as approving does
            return BatchOutcome("refused", batch, reason=decision.reason.replace("approving", "rejecting"),
                                needed_level=decision.needed_level)
        done = await self.batches.reject(batch_id, user, reason)
        if done is None:
            return await self._refused_as_it_is(batch_id)
        return BatchOutcome("done", done)

    async def _refused_as_it_is(self, batch_id: int) -> BatchOutcome:
        """Someone decided the batch first: refused, saying what it is now."""
        now = await self.batches.get(batch_id)
        return BatchOutcome("refused", now, reason=_state_text(now))

    # --- the cases -----------------------------------------------------------------------------------

    async def _open_all(self, batch: dict, plan: Plan, kept: dict[str, list[CheckReport]] | None,
                        authority: Authority) -> list[Case]:
        """Each customer's case, opened and approved, then issued (bounded by the issuer)."""
        gate = asyncio.Semaphore(OPENING_AT_ONCE)
        opened: list[Case] = []

        async def one(line) -> None:
            async with gate:
                case = await self._open_one(batch, line, kept.get(line.customer_id) if kept else None, authority)
            if case is not None:
                opened.append(case)
                if case.state == "approved" and self.cases.issuer is not None:
                    await self.cases.issuer.submit(case.id)

        results = await asyncio.gather(*(one(line) for line in plan.customers), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        for exc in failed:
            log.error("%s: opening a customer's case failed; the sweeper tries again", batch_ticket(batch["id"]),
                      exc_info=exc)
        if not failed:
            await self.batches.mark_opened(batch["id"])
        return sorted(opened, key=lambda c: c.id)

    async def _open_one(self, batch: dict, line, reports: list[CheckReport] | None, authority: Authority
                        ) -> Case | None:
        scope = Scope(line.customer_id, tuple(line.instance_ids), (batch["period"],), multi=True,
                      kind=batch["kind"], label="remediation", label_id=batch_ticket(batch["id"]))
        ev: Evidence | None = None
        if reports is not None and sorted(r.result.instance.instance_id for r in reports) == list(line.instance_ids):
            ev = evidence_of(self.investigator, scope, [batch["period"]], reports)
        req = CheckRequest(instance_id="", periods=[batch["period"]], user=batch["requested_by"],
                           ticket_id=batch_ticket(batch["id"]), channel_id=batch["channel_id"])
        out = await self.cases.open_scope(scope, req, ev=ev, batch_id=batch["id"], approve_by=authority,
                                          expect_cents=line.credit_cents)
        return out.case

    async def resume(self) -> list[int]:
        """Open the cases a crash left unopened, in every approved batch that has some; the
        approval acts with the approver's levels as they were when approving."""
        done = []
        for batch in await self.batches.unopened():
            async with self.batches.locked(batch["id"]) as mine:
                if not mine:
                    continue  # another process is opening this batch
                batch = await self.batches.get(batch["id"])
                if batch["cases_opened"]:
                    continue
                have = {c.customer_id for c in await self.batches.cases(batch["id"])}
                plan = plan_from_json(batch["plan"])
                missing = [line for line in plan.customers if line.customer_id not in have]
                authority = authority_from_levels(self.config, batch["decided_by"],
                                                  tuple(batch["decided_levels"] or ()))
                log.info("%s: resuming, %s customers without a case", batch_ticket(batch["id"]), len(missing))
                await self._watch(batch, plan.customers)  # a crash may have come before the approval's own
                await self._open_all(batch, replace(plan, customers=tuple(missing)), None, authority)
                done.append(batch["id"])
        return done

    async def progress(self, batch_id: int) -> BatchProgress:
        batch = await self.batches.get(batch_id)
        cases = await self.batches.cases(batch_id, remainders=True)

        def one(c: Case) -> BatchCase:
            return BatchCase(c.id, c.customer_id, c.state, c.credit_cents, c.issued_cents or 0, c.reason, c.failures,
                             remainder_of=c.parent_case_id)
        return batch_progress([c["customer_id"] for c in batch["plan"]["customers"]], [one(c) for c in cases])

    async def _watch(self, batch: dict, customers) -> None:
        """A throttle that failed once may fail again: its customers go on the watchlist."""
        if self.watchlist is None or batch["kind"] not in ("throttle_continuous", "throttle_daily"):
            return
        reason = f"{batch_ticket(batch['id'])}: {batch['kind']} {batch['period']} remediated"
        await self.watchlist.add_many([line.customer_id for line in customers], reason,
                                      batch["decided_by"] or "billing-bot")


def _state_text(batch: dict | None) -> str:
    if batch is None:
        return "That batch no longer exists."
    name = batch_ticket(batch["id"])
    if batch["state"] == "approved":
        return f"{name} was already approved (by {batch['decided_by']})."
    if batch["state"] == "rejected":
        return f"{name} was rejected (by {batch['decided_by']}): {batch['reason']}"
    if batch["state"] == "superseded":
        return (f"{name} was replaced by a newer plan ({batch_ticket(batch['superseded_by'])}) because the data "
                "changed: decide that one.")
    return f"{name} is {batch['state']}."
