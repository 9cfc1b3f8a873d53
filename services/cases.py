"""The case service: the only way a case changes. Read this file to see what can happen to a case.

Every person's decision goes the same way: read the person's authority (Slack groups, outside any
transaction), then, in one transaction under the customer's and the instance's locks, re-read the
case, check that the evidence it was built on is unchanged (SPEC 2.2), refresh the customer's
exposure (SPEC 3), ask the pure policy (handlers/cases.py), and make the one conditional UPDATE
with its audit event. Money moves only after that transaction commits (services/issuing.py), and
Slack is told by the caller afterwards: nothing here depends on Slack answering.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Awaitable, Callable, Literal

from handlers.cases import (
    Authority, Case, Decision, can, may_adjust, may_approve, may_reject, may_retry, may_switch_method, other_method,
    state_refusal,
)
from handlers.settings import Config
from services.approvals import MembershipUnknown
from services.case_evidence import Evidence, Scope, gather
from services.inputs import validate_customer_id, validate_org_id
from services.investigation import CheckReport, Investigator
from services.multi_check import check_periods, instances_by_customer
from services.store import CaseStore, CaseTx, Draft

log = logging.getLogger(__name__)
RECHECK_ATTEMPTS = 3  # the evidence changing under a check this many times in a row is an outage, not a race


class StaleEvidence(Exception):
    """The evidence kept changing while the case was being claimed."""


@dataclass(frozen=True)
class Outcome:
    """What a request did. `status`: done; refused (with the reason a person reads); changed (the
    evidence had changed: the case was checked again and waits for a new decision); missing."""

    status: Literal["done", "refused", "changed", "missing", "existing"]
    case: Case | None = None
    reason: str = ""
    needed_level: int = 0
    previous: Case | None = None  # for changed: the case as it was before the new check
    report: CheckReport | None = None  # for a newly opened case: the check it came from

    @property
    def ok(self) -> bool:
        return self.status == "done"


@dataclass(frozen=True)
class CheckRequest:
    instance_id: str
    periods: list[str] | None
    user: str
    ticket_id: str | None = None
    channel_id: str | None = None
    response_url: str | None = None


class CaseService:
    def __init__(self, store: CaseStore, investigator: Investigator, config: Config,
                 authority: Callable[[str], Awaitable[Authority]],
                 approvers: Callable[[int], Awaitable[dict]] | None = None):
        self.store = store
        self.investigator = investigator
        self.config = config
        self.authority = authority  # raises MembershipUnknown when Slack groups cannot be confirmed
        self.approvers = approvers  # who holds a level, snapshotted on the case for the audit
        self.issuer = None  # set by the composition root: something with `async submit(case_id)`

    # --- opening -----------------------------------------------------------------------------------

    async def open(self, req: CheckRequest) -> Outcome:
        """Check the instance and open a case, unless an open case already holds its time in these
        periods (then that case is shown). The claim re-verifies the evidence under the locks."""
        return await self.open_scope(Scope.one(req.instance_id, req.periods or ()), req)

    async def open_customer(self, customer_id: str, req: CheckRequest) -> list[Outcome]:
        """`check customer`: one case over every instance of the customer billed in the periods."""
        return await self._open_grouped("customer", customer_id, req)

    async def open_org(self, org_id: str, req: CheckRequest) -> list[Outcome]:
        """`check org`: one case per customer whose instances the org was billed for."""
        return await self._open_grouped("org", org_id, req)

    async def _open_grouped(self, label: str, scope_id: str, req: CheckRequest) -> list[Outcome]:
        scope_id = validate_customer_id(scope_id) if label == "customer" else validate_org_id(scope_id)
        periods = check_periods(self.investigator, req.periods)
        groups = await instances_by_customer(self.investigator.db, periods, **{f"{label}_id": scope_id})
        if not groups:
            return [Outcome("refused", reason=f"{label} {scope_id} has no billing records in {', '.join(periods)}: "
                                              "there is no charge to judge and no case was opened")]
        out = []
        for customer, instances in sorted(groups.items()):
            scope = Scope(customer, tuple(instances), tuple(periods), multi=True, label=label, label_id=scope_id)
            out.append(await self.open_scope(scope, req))
        return out

    async def open_scope(self, scope: Scope, req: CheckRequest, *, ev: Evidence | None = None,
                         batch_id: int | None = None, approve_by: Authority | None = None,
                         expect_cents: int | None = None) -> Outcome:
        """Open a case over the scope's billed time (one instance, or several of one customer: a
        customer's or an org's check, a remediation batch's customer) under the customer's lock
        and every instance's. `ev`: evidence already read, verified again under the locks.

        A batch's case (batch_id) is approved in the same transaction by the batch's approver
        (approve_by), as any approval is: the policy decides with the case's own exposure, and
        only when the amount is the one the approved plan showed (expect_cents); otherwise it
        waits for a decision of its own like any case."""
        for _ in range(RECHECK_ATTEMPTS):
            ev = ev or await gather(self.investigator, scope)
            report, data, covered = ev.report, ev.data, ev.covered
            if not ev.instances:
                return Outcome("refused", reason=f"no instance of {scope.customer_id or 'this customer'} was billed "
                                                 f"in {', '.join(data['periods'])}: there is nothing to open a case on",
                               report=report)
            requester_covers = await self._covers(req.user, data["credit_cents"])
            approvers = (await self.approvers(data["required_level"])
                         if self.approvers and data["required_level"] else {})
            async with self.store.locked(ev.customer_id, ev.instances) as tx:
                existing = (await tx.batch_case(batch_id, ev.customer_id) if batch_id is not None
                            else await tx.open_case_over(ev.instances, data["periods"]))
                if existing is not None:
                    return Outcome("existing", existing, report=report)
                if data["credit_cents"] > 0 and (
                        await tx.case_fingerprint(ev.instance_orgs, data["periods"]) != ev.fingerprint
                        or await tx.holders(ev.instances, None) != ev.holders
                        or await tx.held_elsewhere(covered, None)):
                    ev = None
                    continue  # a record or another case changed since the check read: check again
                exposure = await tx.exposure(ev.customer_id, self.config.exposure_window, None) \
                    if data["credit_cents"] > 0 else 0
                level = self.config.required_level(data["credit_cents"] + exposure) if data["credit_cents"] else 0
                data["required_level"] = level
                # others are pinged when the requester cannot decide it: too little authority, or four-eyes
                needs_others = data["credit_cents"] > 0 and (self.config.four_eyes or
                                                             not requester_covers(data["credit_cents"] + exposure))
                case = await tx.insert(
                    Draft(report=data, covered=covered, fingerprint=ev.fingerprint, requested_by=req.user,
                          ticket_id=req.ticket_id, channel_id=req.channel_id, response_url=req.response_url,
                          method=self.config.polar.credit_method, approvers=approvers, batch_id=batch_id),
                    required_level=level, exposure_cents=exposure,
                    remind_after_s=self.config.remind_every.total_seconds() if needs_others else None)
                if approve_by is not None and case.state == "pending":
                    case = await self._approve_in(tx, case, approve_by, expect_cents)
            log.info("case %s opened for %s by %s: %s cents, level %s", case.id, case.subject, req.user,
                     case.credit_cents, case.required_level)
            return Outcome("done", case, report=report)
        raise StaleEvidence(f"the billing records of {', '.join(scope.instances[:5])} kept changing while the case "
                            "was opened")

    async def _approve_in(self, tx: CaseTx, case: Case, authority: Authority, expect_cents: int | None) -> Case:
        """A batch's approval applied to one of its cases, inside the caller's locked transaction."""
        if expect_cents is not None and case.credit_cents != expect_cents:
            await tx.event(case.id, authority.user, "refused", {
                "action": "approve", "batch_id": case.batch_id, "credit_cents": case.credit_cents,
                "reason": f"the plan showed {expect_cents} cents for this customer; the check now finds "
                          f"{case.credit_cents}: it needs a decision of its own"})
            return case
        decision = may_approve(case, authority, self.config)
        if not decision.allowed:
            await tx.event(case.id, authority.user, "refused", {
                "action": "approve", "batch_id": case.batch_id, "reason": decision.reason,
                "deciding_cents": case.deciding_cents, "levels": list(authority.levels)})
            return case
        moved = await tx.move(case.id, "approve", authority.user, {
            "credit_cents": case.credit_cents, "method": case.method, "batch_id": case.batch_id},
            decided_by=authority.user, method=case.method)
        return moved or case

    async def _covers(self, user: str, cents: int) -> Callable[[int], bool]:
        try:
            authority = await self.authority(user)
        except MembershipUnknown:
            return lambda cents: False  # unknown: others are pinged, which is the safe side
        return authority.covers

    async def attach_message(self, case: Case, channel_id: str, ts: str) -> Case:
        return await self.store.set_message(case.id, channel_id, ts)

    # --- decisions ---------------------------------------------------------------------------------

    async def approve(self, case_id: int, user: str, method: str | None = None) -> Outcome:
        """Approve (optionally switching the method): the money moves after this commits."""
        def apply(tx: CaseTx, case: Case):
            return tx.move(case.id, "approve", user, {"credit_cents": case.credit_cents,
                                                      "method": method or case.method},
                           decided_by=user, method=method or case.method)
        out = await self._decide(case_id, user, "approve", lambda c, a: may_approve(c, a, self.config), apply,
                                 verify=True)
        if out.ok:
            log.info("case %s approved by %s for %s cents (%s)", case_id, user, out.case.credit_cents, out.case.method)
            await self._submit(case_id)
        return out

    async def adjust(self, case_id: int, user: str, cents: int) -> Outcome:
        """Lower the amount; the needed level is recomputed with the exposure."""
        async def apply(tx: CaseTx, case: Case):
            level = self.config.required_level(cents + case.exposure_cents)
            row = await tx.store_adjust(case.id, cents, level, user)
            return row
        return await self._decide(case_id, user, "adjust", lambda c, a: may_adjust(c, a, self.config, cents), apply)

    async def reject(self, case_id: int, user: str, reason: str) -> Outcome:
        reason = reason.strip()
        if len(reason) < 3:
            return Outcome("refused", reason="say why, in a few words")

        async def policy_with_money(tx: CaseTx, case: Case, authority: Authority) -> Decision:
            return may_reject(case, authority, self.config, await tx.moved_cents(case.id))

        def apply(tx: CaseTx, case: Case):
            return tx.move(case.id, "reject", user, {"reason": reason}, decided_by=user, reason=reason)
        return await self._decide(case_id, user, "reject", None, apply, async_policy=policy_with_money)

    async def retry(self, case_id: int, user: str, failure: int | None = None, switch: bool = False) -> Outcome:
        """Issue the unpaid part of a failed case again, by the same or the other method. `failure`
        is the number of the failure whose button was pressed: an old one does nothing."""
        action = "switch_method" if switch else "retry"
        policy = (lambda c, a: may_switch_method(c, a, self.config, failure)) if switch else \
            (lambda c, a: may_retry(c, a, self.config, failure))

        def apply(tx: CaseTx, case: Case):
            method = other_method(case.method) if switch else case.method
            return tx.move(case.id, action, user, {"method": method}, method=method)
        out = await self._decide(case_id, user, action, policy, apply, verify=True)
        if out.ok:
            await self._submit(case_id)
        return out

    async def _decide(self, case_id: int, user: str, action: str, policy, apply, *, verify: bool = False,
                      async_policy=None) -> Outcome:
        case = await self.store.get(case_id)
        if case is None:
            return Outcome("missing", reason=f"Case #{case_id} does not exist.")
        if not can(action, case.state):
            return Outcome("refused", case, state_refusal(case))
        try:
            authority = await self.authority(user)
        except MembershipUnknown as exc:
            await self.store.event(case_id, user, "refused", {"action": action, "reason": str(exc)})
            log.info("case %s: %s by %s refused: %s", case_id, action, user, exc)
            return Outcome("refused", case, str(exc), case.required_level)
        changed = False
        async with self.store.locked(case.customer_id, case.instances) as tx:
            case = await tx.get(case_id)
            if not can(action, case.state):
                return Outcome("refused", case, state_refusal(case))
            if verify and not await self._evidence_holds(tx, case):
                changed = True
                floor = await tx.moved_cents(case.id)
            else:
                case = await self._refresh_exposure(tx, case)
                decision = (await async_policy(tx, case, authority)) if async_policy else policy(case, authority)
                if not decision.allowed:
                    if decision.needed_level:  # a lack of authority is audited; a mistyped amount is not
                        await tx.event(case_id, user, "refused", {
                            "action": action, "reason": decision.reason, "credit_cents": case.credit_cents,
                            "deciding_cents": case.deciding_cents, "levels": list(authority.levels)})
                        log.info("case %s: %s by %s refused: %s", case_id, action, user, decision.reason)
                    return Outcome("refused", case, decision.reason, decision.needed_level)
                moved = await apply(tx, case)
        if changed:
            return await self.recheck(case, actor=user, floor_cents=floor)
        if moved is None:  # cannot happen under the lock, but never pretend
            return Outcome("refused", await self.store.get(case_id), state_refusal(await self.store.get(case_id)))
        return Outcome("done", moved)

    async def _evidence_holds(self, tx: CaseTx, case: Case) -> bool:
        fp = await tx.case_fingerprint(case.instance_orgs, case.periods)
        return fp == case.fingerprint and not await tx.held_elsewhere(await tx.case_pieces(case.id), case.id)

    async def _refresh_exposure(self, tx: CaseTx, case: Case) -> Case:
        exposure = await tx.exposure(case.customer_id, self.config.exposure_window, case.id)
        level = self.config.required_level(case.credit_cents + exposure)
        if exposure != case.exposure_cents or level != case.required_level:
            case = await tx.set_exposure(case.id, exposure, level) or replace(case, exposure_cents=exposure,
                                                                              required_level=level)
        return case

    async def offer_remainder(self, parent: Case) -> Case | None:
        """What the order's refundable amount left unpaid, offered as invoice credit (SPEC 4): a
        pending case of its own (its own decision, corrections row and letter), linked to the case
        it completes, at most one; whoever approves it needs authority over it plus exposure."""
        if parent.state != "issued" or not parent.remainder_cents:
            return None
        async with self.store.locked(parent.customer_id, parent.instances) as tx:
            existing = await tx.remainder_of(parent.id)
            if existing is not None:
                return existing
            exposure = await tx.exposure(parent.customer_id, self.config.exposure_window, None)
            report = {**parent.report, "credit_cents": parent.remainder_cents, "credit_by_period": {},
                      "remainder_of": parent.id}
            level = self.config.required_level(parent.remainder_cents + exposure)
            # the evidence as it stands with the parent issued: a later change re-checks the remainder
            fingerprint = await tx.case_fingerprint(parent.instance_orgs, parent.periods)
            draft = Draft(report=report, covered=[], fingerprint=fingerprint,
                          requested_by=parent.requested_by, ticket_id=parent.ticket_id, channel_id=parent.channel_id,
                          response_url=parent.response_url, method="invoice_credit", approvers={},
                          batch_id=parent.batch_id)
            child = await tx.insert(draft, required_level=level, exposure_cents=exposure,
                                    remind_after_s=self.config.remind_every.total_seconds(),
                                    parent_case_id=parent.id, credit_cents=parent.remainder_cents)
        log.info("case %s: the remainder of case %s (%s cents) offered as invoice credit", child.id, parent.id,
                 child.credit_cents)
        return child

    # --- the evidence changed ----------------------------------------------------------------------

    async def recheck(self, case: Case, actor: str = "billing-bot", floor_cents: int = 0) -> Outcome:
        """Check the instance again and put the new amount on the case, which then waits for a new
        decision (or expires when nothing is left to credit and nothing moved). Nothing is approved
        meanwhile. floor_cents: what already reached the customer; the case never asks for less."""
        if case.parent_case_id is not None:
            return await self._recheck_remainder(case, actor, floor_cents)
        for _ in range(RECHECK_ATTEMPTS):
            ev = await gather(self.investigator, Scope.of_case(case), exclude_case=case.id)
            data = ev.data
            async with self.store.locked(case.customer_id, case.instances) as tx:
                # the records, and which other cases hold the time, must be as the check read them:
                # two twins re-checked at once would otherwise each give up the time to the other
                # with the orgs the check read (an instance moved to another org since the case)
                if await tx.case_fingerprint(ev.instance_orgs, case.periods) != ev.fingerprint \
                        or await tx.holders(case.instances, case.id) != ev.holders \
                        or await tx.held_elsewhere(ev.covered, case.id):
                    continue
                exposure = await tx.exposure(case.customer_id, self.config.exposure_window, case.id)
                level = self.config.required_level(data["credit_cents"] + exposure) if data["credit_cents"] else 0
                data["required_level"] = level
                new = await tx.replace_evidence(
                    case.id, Draft(report=data, covered=ev.covered, fingerprint=ev.fingerprint,
                                   requested_by=case.requested_by, ticket_id=case.ticket_id,
                                   channel_id=case.channel_id, response_url=case.response_url, method=case.method,
                                   approvers={}),
                    required_level=level, exposure_cents=exposure, actor=actor, floor_cents=floor_cents,
                    remind_after_s=self.config.remind_every.total_seconds(),
                    detail={"was_cents": case.credit_cents, "now_cents": data["credit_cents"],
                            "moved_cents": floor_cents})
            if new is None:
                now = await self.store.get(case.id)
                return Outcome("refused", now, state_refusal(now))
            log.info("case %s: the evidence changed; %s -> %s cents, waits for a new decision", case.id,
                     case.credit_cents, new.credit_cents)
            return Outcome("changed", new, "The billing evidence changed since this case was opened: it was "
                                           "checked again and needs a new decision.", new.required_level,
                           previous=case)
        raise StaleEvidence(f"the billing records of {case.subject} kept changing")

    async def _recheck_remainder(self, child: Case, actor: str, floor_cents: int) -> Outcome:
        """A remainder's evidence changed: what the periods are worth now, less what its parent
        issued, is what it may still credit (never less than what already moved; expired at 0)."""
        parent = await self.store.get(child.parent_case_id)
        for _ in range(RECHECK_ATTEMPTS):
            ev = await gather(self.investigator, Scope.of_case(parent), exclude_case=parent.id)
            data = ev.data
            owed = max(data["credit_cents"] - (parent.issued_cents or 0), 0)
            async with self.store.locked(child.customer_id, child.instances) as tx:
                if await tx.case_fingerprint(ev.instance_orgs, child.periods) != ev.fingerprint:
                    continue
                exposure = await tx.exposure(child.customer_id, self.config.exposure_window, child.id)
                credit = max(owed, floor_cents)
                level = self.config.required_level(credit + exposure) if credit else 0
                new = await tx.replace_evidence(
                    child.id, Draft(report={**data, "credit_cents": owed, "credit_by_period": {},
                                            "remainder_of": parent.id, "required_level": level},
                                    covered=[], fingerprint=ev.fingerprint, requested_by=child.requested_by,
                                    ticket_id=child.ticket_id, channel_id=child.channel_id,
                                    response_url=child.response_url, method=child.method, approvers={}),
                    required_level=level, exposure_cents=exposure, actor=actor, floor_cents=floor_cents,
                    remind_after_s=self.config.remind_every.total_seconds(),
                    detail={"was_cents": child.credit_cents, "now_cents": owed, "moved_cents": floor_cents,
                            "parent_issued_cents": parent.issued_cents})
            if new is None:
                now = await self.store.get(child.id)
                return Outcome("refused", now, state_refusal(now))
            log.info("case %s (remainder of %s): the evidence changed; %s -> %s cents", child.id, parent.id,
                     child.credit_cents, new.credit_cents)
            return Outcome("changed", new, "The billing evidence changed since this remainder was offered: it "
                                           "was checked again and needs a new decision.", new.required_level,
                           previous=child)
        raise StaleEvidence(f"the billing records of {child.subject} kept changing")

    # --- issuing (services/issuing.py moves the money; these are its changes of state) --------------

    async def start_issuing(self, case: Case) -> Case | None:
        return await self.store.move(case.id, "start_issuing", "billing-bot", {"method": case.method})

    async def verify_before_money(self, case: Case, moved_cents: int = 0) -> Outcome | None:
        """The last look before money of this case moves (SPEC 2.2), however it got here (a first
        issuing, a resumed one, a retry): None when the evidence still holds, else the outcome of
        checking the case again, which never asks for less than what already moved."""
        async with self.store.locked(case.customer_id, case.instances) as tx:
            if await self._evidence_holds(tx, case):
                return None
        return await self.recheck(case, floor_cents=moved_cents)

    async def finish_issued(self, case: Case, **kw) -> Case | None:
        done = await self.store.finish_issued(case, **kw)
        if done is not None:
            log.info("case %s issued: %s cents (%s)", case.id, done.issued_cents, done.polar_reference)
        return done

    async def fail(self, case: Case, reason: str) -> Case | None:
        row = await self.store.move(case.id, "mark_failed", "billing-bot", {"reason": reason}, reason=reason)
        if row is not None:
            log.warning("case %s: issuing failed: %s", case.id, reason)
        return row

    async def _submit(self, case_id: int) -> None:
        if self.issuer is not None:
            await self.issuer.submit(case_id)
