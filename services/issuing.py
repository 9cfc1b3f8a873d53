"""Issue an approved case's credit in Polar exactly once (SPEC 4).

Exactly once, whatever happens:
- one worker per case, on any replica: a session advisory lock on the case, taken on the one
  connection that does all of the worker's database work (so issuing never waits for a second
  connection), and at most `workers` issuings at once per process, on a pool of their own
  (`Database.worker_pool`: the main pool stays for checks and Slack);
- before any money of the case moves, the evidence is looked at once more under the instance's
  lock; if it changed, the case is checked again and waits for a new decision (SPEC 2.2);
- the intent is written to the outbox (`issuances`, unique per case and order) before any call;
- refunds have no idempotency key in Polar, so before every POST, and after any timeout, 5xx or
  lost response, the order's refunds are read back (`GET /v1/refunds/?order_id=`) and a refund
  whose metadata.case_id is this case counts as made;
- a refund is money moved only when Polar says `succeeded`; `pending` keeps the case issuing until
  a webhook or the sweeper's read-back settles it; `failed` / `canceled` fail the case with Polar's
  reason and offer the other method for the unpaid part;
- retrying or switching method moves only the unpaid part: what Polar confirmed stays;
- every replica sweeps cases left approved, issuing, or issued but not announced (SKIP LOCKED), so
  a dead worker or a Slack outage never strands an approved credit;
- `invoice_credit` events carry an external_id derived from the case, and Polar deduplicates on it.
The case ends issued (its one billing_corrections row in the same transaction) or failed with a reason.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Protocol

from handlers.cases import Case
from handlers.orders import invoicing_order  # noqa: F401  (re-exported for tests)
from handlers.settings import Config
from handlers.timeline import allocate, fmt_money, from_us
from services.background import Background
from services.cases import CaseService, Outcome
from services.config import ISSUING_WORKERS
from services.polar import PolarClient, PolarError, PolarUnavailable, refund_failure_reason
from services.store import Outbox

log = logging.getLogger(__name__)
REFUND_POST_ATTEMPTS = 3
RATE_LIMITED_POSTS = 10  # refund POSTs Polar may answer 429 on top of those, each after its Retry-After
SETTLED = {"succeeded": "confirmed", "pending": "pending", "failed": "failed", "canceled": "failed"}


class IssueFailed(Exception):
    def __init__(self, reason: str, offer_other_method: bool = False):
        super().__init__(reason)
        self.offer_other_method = offer_other_method


class Notifier(Protocol):
    async def issued(self, case: Case, refs: list[str], remainder_cents: int) -> None: ...

    async def failed(self, case: Case, reason: str, offer_other_method: bool) -> None: ...

    async def rechecked(self, outcome: Outcome) -> None: ...

    async def pending(self, case: Case, refs: list[str]) -> None: ...

    async def outside(self, case: Case, amount_cents: int, reason: str) -> None: ...

    async def reverted(self, case: Case, refund_id: str, amount_cents: int, status: str) -> None: ...

    async def remainder_offered(self, parent: Case, child: Case) -> None: ...


@dataclass
class Progress:
    refs: list[str]
    issued: int  # confirmed by Polar, any method
    pending: bool = False  # a refund Polar has not settled yet


@dataclass
class Issuer:
    cases: CaseService
    polar: PolarClient
    config: Config
    notifier: Notifier
    lookup_delay_s: float = 0.5
    # issuings at once per process (BILLING_BOT_ISSUING_WORKERS); each binds a connection of the
    # workers' own pool (Database.worker_pool, sized to them), so the pool of 8 stays for checks and Slack
    workers: int = ISSUING_WORKERS
    poll_pending_after_s: float = 600.0  # read back pending refunds after this (0: every sweep)
    in_flight_window_s: float | None = None  # how long a POST elsewhere may still be running (None: 2x timeout)
    background: Background | None = None  # the issuing workers, bounded to `workers`
    _pool_fitted: bool = field(default=False, repr=False)

    @property
    def store(self):
        return self.cases.store

    @property
    def outbox(self) -> Outbox:
        return Outbox(self.store)

    async def submit(self, case_id: int) -> None:
        """Issue in the background, bounded; the caller (a Slack listener) returns at once."""
        if self.background is None:
            self.background = Background(limit=self.workers, name="issuing")
        self.background.spawn(self.issue_logged(case_id), f"issuing case {case_id}")

    async def drain(self, timeout_s: float) -> None:
        """Wait for in-flight issuing (shutdown); whatever is cut off, the sweeper resumes."""
        if self.background is not None:
            await self.background.drain(timeout_s)

    async def issue_logged(self, case_id: int) -> Case | None:
        try:
            return await self.issue(case_id)
        except Exception:
            log.exception("issuing case %s stopped; the sweeper will resume it", case_id)
            return None

    async def sweep_once(self, older_than_s: float = 60.0) -> list[int]:
        """Resume what a crash, a restart or a Slack outage left behind; replicas share the work."""
        ids = await self.store.claim_unfinished(older_than_s)
        for case_id in ids:
            await self.issue_logged(case_id)
        return ids

    async def resume_unfinished(self, older_than_s: float = 0, max_rounds: int = 100) -> list[int]:
        """Sweep until nothing unfinished is left (a sweep takes a batch), or a round finds only
        cases it already tried (held by a live worker elsewhere: that worker finishes them)."""
        done: list[int] = []
        for _ in range(max_rounds):
            ids = await self.sweep_once(older_than_s)
            fresh = [i for i in ids if i not in done]
            done += fresh
            if not fresh:
                break
        return done

    async def run_sweeper(self, every_s: float, older_than_s: float = 60.0) -> None:
        while True:
            try:
                await self.resume_unfinished(older_than_s)  # batch after batch, so a backlog clears in one tick
            except Exception:
                log.exception("issuing sweep failed; the next one retries")
            await asyncio.sleep(every_s)

    async def issue(self, case_id: int) -> Case | None:
        if not self._pool_fitted:  # the workers' pool has a connection for each worker and the sweeper
            await self.store.db.fit_worker_pool(self.workers)
            self._pool_fitted = True
        async with self.store.bound():
            if not await self.store.try_lock_case(case_id):
                return None  # another worker, here or on another replica, holds this case
            try:
                return await self._issue_locked(case_id)
            finally:
                await self.store.unlock_case(case_id)

    async def _issue_locked(self, case_id: int) -> Case | None:
        case = await self.store.get(case_id)
        if case is None:
            return None
        if case.state == "issued":
            if not case.notified:
                await self._offer_remainder(case)  # again, if a crash came between issuing and the offer
                await self._announce(case)
            return case
        if case.state in ("approved", "issuing"):
            # The last look at the evidence before money moves, however the worker got here (first
            # run, resumed after a crash, a retry): not while money is in flight (pending, or sent
            # without an answer), which must be settled first, and not when all of it moved.
            rows = await self._settled_issuances(case)
            if self._posting_elsewhere(rows):
                # A worker whose connection died (its session lock with it) may still be waiting on
                # Polar's answer to its POST: no second POST until that call has surely ended. The
                # sweeper comes back; the lookup then finds the refund, or nothing and posts safely.
                log.info("case %s: a refund POST may still be in flight elsewhere; left for the sweeper", case.id)
                return case
            in_flight = any(i["state"] == "pending" or (i["state"] == "intent" and i["attempts"] > 0) for i in rows)
            if not in_flight and _paid(rows) < case.credit_cents:
                changed = await self.cases.verify_before_money(case, _paid(rows))
                if changed is not None:
                    await self._tell(self.notifier.rechecked(changed), case)
                    return changed.case
        if case.state == "approved":
            case = await self.cases.start_issuing(case)
            if case is None:
                return None
        elif case.state != "issuing":
            return None
        try:  # the outbox as settled above: Polar is asked once per run, not again here
            if case.method == "invoice_credit":
                progress = await self._invoice_credit(case, rows)
            else:
                progress = await self._refunds(case, rows)
        except IssueFailed as exc:
            return await self._fail(case, str(exc), exc.offer_other_method)
        except Exception as exc:  # a bug or an outage: fail loudly, keep the outbox for the retry
            log.exception("issuing case %s failed", case_id)
            return await self._fail(case, f"{type(exc).__name__}: {exc}", False)
        if progress.pending:
            if not await self.store.has_event(case.id, "refund_pending"):
                await self.store.event(case.id, "billing-bot", "refund_pending", {"refs": progress.refs})
                await self._tell(self.notifier.pending(case, progress.refs), case)
            return case
        done = await self._finalize(case, progress)
        if done is not None:
            await self._offer_remainder(done)
            await self._announce(done)
        return done

    def _posting_elsewhere(self, rows: list[dict]) -> bool:
        """A refund intent tried, its outcome unknown (the lookup found no refund), within the time
        one POST can take (the client's timeout, twice over)."""
        return any(i["method"] == "refund" and i["state"] == "intent" and i["attempts"] > 0 and self._recent(i)
                   for i in rows)

    def _recent(self, intent: dict) -> bool:
        window = 2 * self.polar.timeout_s if self.in_flight_window_s is None else self.in_flight_window_s
        return time.time() - intent["updated_at"].timestamp() < window

    # --- what is already paid ----------------------------------------------------------------------

    async def _settled_issuances(self, case: Case) -> list[dict]:
        """The case's outbox, with every refund whose outcome is unknown looked up first (a crash
        or a timeout after a POST), and pending refunds read back when they are due."""
        rows = await self.outbox.for_case(case.id)
        for i in rows:
            if i["method"] != "refund":
                continue
            unknown = i["state"] == "intent" and i["attempts"] > 0
            due = i["state"] == "pending" and (
                self.poll_pending_after_s <= 0
                or time.time() - i["updated_at"].timestamp() >= self.poll_pending_after_s)
            if unknown or due:
                found = await self._find_refund(i["target"], case.id, i.get("polar_ref"))
                if found:
                    await self.settle_refund(i, found)
                elif unknown and not self._recent(i):
                    # its POST has surely ended and Polar holds no refund of it: it was not made, so
                    # it neither counts as money moved nor holds the amount (a re-check may lower it)
                    await self.outbox.fail(i["id"], "Polar holds no refund of this attempt: not made")
        return await self.outbox.for_case(case.id)

    async def settle_refund(self, intent: dict, refund: dict) -> str:
        """Record what Polar says of a refund: succeeded -> confirmed, pending, failed/canceled ->
        failed (no money moved). Returns the intent's state afterwards (a late or stale report
        changes nothing: Outbox.settle). Used by the webhooks too."""
        state = SETTLED.get(refund.get("status") or "succeeded", "pending")
        if await self.outbox.settle(intent["id"], state, refund["id"], refund.get("status")):
            return state  # the UPDATE set exactly this state
        now = next(i for i in await self.outbox.for_case(intent["case_id"]) if i["id"] == intent["id"])
        return now["state"]

    async def on_polar_event(self, event, webhook_id: str) -> None:
        """A verified Polar webhook (services/polar_webhooks.py): a refund the bot made moved on,
        or Polar refunded an order of ours on its own. Quick: the issuing itself runs in a worker."""
        from services.polar_webhooks import RefundUpdate

        if not isinstance(event, RefundUpdate):
            return  # order.refunded repeats what the refund events say
        case_id = int(event.case_id) if event.case_id and event.case_id.isdigit() else None
        if case_id is not None:
            intent = await self.outbox.by_refund(event.refund_id, case_id, event.order_id)
            if intent is None:  # one of ours, tried before a retry: history, not the current refund
                log.info("case %s: Polar reports refund %s %s, no longer the case's refund (webhook %s)",
                         case_id, event.refund_id, event.status, webhook_id)
                return
            if intent["state"] == "confirmed" and event.status in ("failed", "canceled"):
                await self._reverted(intent, event)
                return
            before = intent["state"]
            state = await self.settle_refund(intent, {"id": event.refund_id, "status": event.status})
            log.info("case %s: Polar reports refund %s %s (webhook %s)", intent["case_id"], event.refund_id,
                     event.status, webhook_id)
            if state != before and state != "pending":
                await self.submit(intent["case_id"])  # finish the case, or fail it with Polar's word
            return
        for other in await self.store.cases_with_order(event.order_id):
            if await self.store.event_once(other, "polar", "refund_outside_bot", event.refund_id, {
                    "refund_id": event.refund_id, "amount_cents": event.amount_cents, "status": event.status,
                    "reason": event.reason}):
                log.warning("case %s: Polar refunded %s cents on order %s outside the bot (%s)", other,
                            event.amount_cents, event.order_id, event.reason)
                case = await self.store.get(other)
                await self._tell(self.notifier.outside(case, event.amount_cents, event.reason), case)

    async def _reverted(self, intent: dict, event) -> None:
        """Polar reversed a refund it had reported succeeded: the money went back. The case keeps
        its record of what was issued (history is not rewritten), but the reversal is recorded,
        told in the thread and to the approver, and the books check flags the mismatch."""
        if await self.store.event_once(intent["case_id"], "polar", "refund_reverted", event.refund_id, {
                "refund_id": event.refund_id, "amount_cents": event.amount_cents, "status": event.status}):
            log.error("case %s: Polar reversed refund %s of %s cents (%s)", intent["case_id"], event.refund_id,
                      event.amount_cents, event.status)
            case = await self.store.get(intent["case_id"])
            await self._tell(self.notifier.reverted(case, event.refund_id, event.amount_cents, event.status), case)

    # --- refunds -------------------------------------------------------------------------------------

    def _split(self, case: Case) -> dict[str, int]:
        by_period = {p: Decimal(c) for p, c in (case.report.get("credit_by_period") or {}).items()}
        if not by_period:
            by_period = {max(case.periods): Decimal(1)}
        return allocate(case.credit_cents, by_period)

    async def _refunds(self, case: Case, rows: list[dict]) -> Progress:
        _no_unknown_invoice_credit(rows)
        failed_now = [i for i in rows if i["method"] == "refund" and i["state"] == "failed"
                      and i["refund_status"] in ("failed", "canceled") and not i["failure_told"]]
        if failed_now:
            for i in failed_now:
                await self.outbox.mark_failure_told(i["id"])
            i = failed_now[0]
            raise IssueFailed(f"Polar reports the refund {i['polar_ref']} of {fmt_money(i['amount_cents'])} on "
                              f"{i['period']} as {i['refund_status']}: no money moved for it. Issue the unpaid "
                              "part as invoice credit, or retry the refund.", offer_other_method=True)
        if any(i["state"] == "pending" for i in rows):
            return Progress(_refs(rows), _paid(rows), pending=True)
        unpaid = case.credit_cents - _paid(rows)
        if unpaid <= 0:
            return Progress(_refs(rows), _paid(rows))
        orders = await self.polar.orders(case.customer_id)
        by_order: dict[str, list] = {}  # periods one order invoiced are refunded together, once
        missing = []
        for period, target_cents in sorted(self._split(case).items()):
            order = invoicing_order(orders, period)
            if order is None:
                missing.append(period)
            else:
                entry = by_order.setdefault(order["id"], [order, [], 0])
                entry[1].append(period)
                entry[2] += target_cents
        if missing:
            raise IssueFailed(f"{', '.join(missing)} not invoiced yet, so there is no order to refund. "
                              "Issue it as invoice credit instead (it appears on the next invoice).",
                              offer_other_method=True)
        reason = "duplicate" if set(case.kinds) == {"duplicate_charge"} else "service_disruption"
        left = unpaid
        for order, periods, target_cents in by_order.values():
            period = ",".join(periods)
            rows = await self.outbox.for_case(case.id)
            intent = next((i for i in rows if i["target"] == order["id"]), None)
            if intent is not None and intent["state"] in ("confirmed", "pending"):
                continue
            if intent is not None and intent["state"] == "intent" and intent["attempts"] > 0:
                amount = intent["amount_cents"]  # a POST of it may be in Polar: the same amount
            else:
                want = min(target_cents - _paid([r for r in rows if r["target"] == order["id"]]), left)
                amount = min(want, int(order["refundable_amount"]))
                if amount <= 0:
                    continue  # nothing the order can take: the rest stays unpaid, offered below
                if intent is not None and intent["state"] == "intent":
                    # written by a run that died before its first attempt: never POSTed (attempts are
                    # counted first, under this lock), so it takes what the case is worth now (a
                    # re-check since may have changed it); still read back first, as any resumed one
                    intent = await self.outbox.reamount(intent["id"], amount)
                    if intent is None:
                        raise RuntimeError(f"case {case.id}: an untried intent was tried under the case's lock")
                elif intent is not None:  # reopened: a POST of its earlier life may have landed after all
                    intent = await self.outbox.reopen(intent["id"], amount)
                else:
                    intent = await self.outbox.intend(case.id, "refund", order["id"], period, amount)
            left -= amount
            refund = await self._refund_once(case, intent, order, period, amount, reason)
            state = await self.settle_refund(intent, refund)
            if state == "failed":
                await self.outbox.mark_failure_told(intent["id"])
                raise IssueFailed(f"Polar reports the refund {refund['id']} of {fmt_money(amount)} on {period} as "
                                  f"{refund.get('status')}: no money moved for it.", offer_other_method=True)
        rows = await self.outbox.for_case(case.id)
        pending = any(i["state"] == "pending" for i in rows)
        if not pending and _paid(rows) == 0:
            raise IssueFailed("the orders that invoiced these periods have nothing left to refund (already fully "
                              "refunded): nothing was paid. Issue it as invoice credit instead.",
                              offer_other_method=True)
        return Progress(_refs(rows), _paid(rows), pending=pending)

    async def _find_refund(self, order_id: str, case_id: int, refund_id: str | None = None) -> dict | None:
        refunds = await self.polar.refunds_for_order(order_id)
        if refund_id:
            for refund in refunds:
                if refund.get("id") == refund_id:
                    return refund
        for refund in refunds:
            if str((refund.get("metadata") or {}).get("case_id")) == str(case_id) \
                    and refund.get("status") not in ("failed", "canceled"):
                return refund
        return None

    async def _refund_once(self, case: Case, intent: dict, order: dict, period: str, amount: int, reason: str) -> dict:
        """One refund for (case, order): found, or created; never two. The order's refunds are read
        back before every POST, a fresh intent's first included: the outbox is our record, Polar's
        is the money, and a refund of the case Polar holds without an outbox row (the database's
        last commits lost in a failover or a restore) must count as made, not be made again."""
        found = await self._find_refund(order["id"], case.id)
        if found:
            return found
        metadata = {"case_id": str(case.id), "instance_id": _instances_text(case), "period": period}
        if case.ticket_id:
            metadata["ticket_id"] = case.ticket_id
        if case.batch_id:
            metadata["batch_id"] = str(case.batch_id)
        body = {"order_id": order["id"], "amount": amount, "reason": reason, "metadata": metadata,
                "comment": f"billing-bot case {case.id}: {', '.join(case.kinds)}", "revoke_benefits": False}
        last = ""
        tries = limited = 0
        while tries < REFUND_POST_ATTEMPTS:
            # a 429's pause is waited out before the attempt is recorded, not inside the POST: the
            # POST must end within the in-flight window of its attempt (_posting_elsewhere)
            await self.polar.wait_rate_limit()
            await self.outbox.attempt(intent["id"])
            try:
                refund = await self.polar.create_refund(body)
            except PolarUnavailable as exc:
                last = str(exc)
                await self.outbox.note_error(intent["id"], last)
                # the refund may have been made: read it back before any new POST
                await asyncio.sleep(max(exc.retry_after or 0, self.lookup_delay_s))
                found = await self._find_refund(order["id"], case.id)
                if found:
                    return found
                if exc.rate_limited and limited < RATE_LIMITED_POSTS:
                    limited += 1  # a rate limit slows the case down (SPEC 5.3); the read-back still came first
                else:
                    tries += 1
                continue
            except PolarError as exc:
                await self.outbox.fail(intent["id"], str(exc))
                where = f"order {order.get('invoice_number') or order['id']} ({period}, {fmt_money(amount)})"
                raise IssueFailed(f"{where}: {refund_failure_reason(exc)}",
                                  offer_other_method=exc.status in (400, 403, 422)) from exc
            log.info("case %s: refund %s of %s cents on order %s (%s)", case.id, refund.get("id"), amount,
                     order["id"], refund.get("status"))
            return refund
        # looked up after every attempt and none is on the order: not made, so nothing moved
        await self.outbox.fail(intent["id"], f"not made: {last}")
        raise IssueFailed(f"Polar did not confirm the refund on order {order['id']} ({period}) after "
                          f"{REFUND_POST_ATTEMPTS} attempts ({last}), and none is on the order: safe to retry")

    # --- invoice credit ----------------------------------------------------------------------------

    async def _invoice_credit(self, case: Case, rows: list[dict]) -> Progress:
        if any(i["state"] == "pending" for i in rows):
            return Progress(_refs(rows), _paid(rows), pending=True)
        target = f"billing-bot-case-{case.id}"
        mine = next((i for i in rows if i["target"] == target), None)
        if mine is not None and mine["state"] == "confirmed":
            return Progress(_refs(rows), _paid(rows))
        if mine is not None and mine["state"] == "intent":
            amount = mine["amount_cents"]  # events may be partly in: the same amount, the same ids
        else:
            amount = case.credit_cents - _paid(rows)  # only the unpaid part moves
            if amount <= 0:
                return Progress(_refs(rows), _paid(rows))
            mine = (await self.outbox.reopen(mine["id"], amount) if mine is not None
                    else await self.outbox.intend(case.id, "invoice_credit", target, None, amount))
        events = await self._compensating_events(case, target, amount)
        await self.outbox.attempt(mine["id"])
        for i in range(0, len(events), 100):
            await self.polar.ingest_events(events[i:i + 100])  # retried: external_id makes it harmless
        await self.outbox.confirm(mine["id"], f"{len(events)} compensating usage events ({target}-*)")
        log.info("case %s: %s cents as %s compensating usage events", case.id, amount, len(events))
        return Progress(_refs(await self.outbox.for_case(case.id)), _paid(await self.outbox.for_case(case.id)))

    async def _compensating_events(self, case: Case, prefix: str, amount: int) -> list[dict]:
        # a remainder's case credits part of the pieces its parent holds
        source = await self.store.get(case.parent_case_id) if case.parent_case_id else case
        pieces = await self.store.pieces(source.id)
        share = Decimal(amount) / Decimal(source.proposed_cents or 1)
        true_tiers = source.report.get("true_tiers") or {}  # per instance, for a case over several
        name = self.config.polar.usage_event_name
        events = []
        for i, p in enumerate(pieces):
            hours = Decimal(p["end_us"] - p["start_us"]) / Decimal(3_600_000_000) * max(p["extra_events"], 1) * share
            h = float(round(hours, 6))  # a quantity of hours for Polar's meter, not money
            true_tier = true_tiers.get(p["instance_id"]) or source.report.get("true_tier")
            meta = {"org_id": p["org_id"], "instance_id": p["instance_id"], "record_id": p["record_id"],
                    "start_time": _iso(p["start_us"]), "end_time": _iso(p["end_us"]), "case_id": str(case.id)}
            events.append({"name": name, "external_customer_id": case.customer_id, "external_id": f"{prefix}-{i}-neg",
                           "metadata": {**meta, "tier": p["tier"], "hours": -h}})
            if p["kind"] == "wrong_tier" and true_tier:
                events.append({"name": name, "external_customer_id": case.customer_id,
                               "external_id": f"{prefix}-{i}-pos", "metadata": {**meta, "tier": true_tier, "hours": h}})
        return events

    # --- endings -------------------------------------------------------------------------------------

    async def _finalize(self, case: Case, progress: Progress) -> Case | None:
        """issuing -> issued and the billing_corrections row, in one transaction."""
        findings = case.report["findings"]
        leading = max(findings, key=lambda f: f["credit_cents"])["kind"] if findings else "duplicate_charge"
        remainder = max(case.credit_cents - progress.issued, 0)
        notes = (f"billing-bot case {case.id} ({case.subject}, {', '.join(case.periods)}); "
                 f"method {case.method}; Polar: {', '.join(progress.refs)}; root cause: "
                 + "; ".join(f"{f['kind']} {fmt_money(f['credit_cents'])}: {f['summary']}" for f in findings))
        if case.parent_case_id:
            notes += f"; the remainder of case {case.parent_case_id}"
        if remainder:
            notes += f"; {fmt_money(remainder)} not refundable on the order, left for a lead"
        return await self.cases.finish_issued(case, issued=progress.issued, refs=progress.refs, remainder=remainder,
                                              leading_kind=leading, notes=notes)

    async def _offer_remainder(self, case: Case) -> None:
        """A capped refund's remainder becomes its own case, once (offer_remainder is idempotent)."""
        if not case.remainder_cents:
            return
        existed = await self.store.remainder_case(case.id)
        child = await self.cases.offer_remainder(case)
        if child is not None and existed is None:
            await self._tell(self.notifier.remainder_offered(case, child), case)

    async def _announce(self, case: Case) -> None:
        """Tell Slack and the customer; marked done only when all of it went through, so the
        sweeper retries an announcement a Slack or SMTP outage cut short."""
        refs = [r for r in (case.polar_reference or "").split(", ") if r]
        await self.notifier.issued(case, refs, case.remainder_cents or 0)
        await self.store.mark_notified(case.id)

    async def _fail(self, case: Case, reason: str, offer_other_method: bool) -> Case | None:
        row = await self.cases.fail(case, reason)
        if row is not None:
            await self._tell(self.notifier.failed(row, reason, offer_other_method), row)
        return row

    async def _tell(self, coro, case: Case) -> None:
        """Slack being down never undoes or blocks the money: log it with the case id."""
        try:
            await coro
        except Exception:
            log.exception("case %s: telling Slack failed (the case itself is recorded)", case.id)


def _paid(rows: list[dict]) -> int:
    return sum(i["amount_cents"] for i in rows if i["state"] == "confirmed")


def _refs(rows: list[dict]) -> list[str]:
    return [i["polar_ref"] for i in rows if i["state"] in ("confirmed", "pending") and i["polar_ref"]]


def _no_unknown_invoice_credit(rows: list[dict]) -> None:
    for i in rows:
        if i["method"] == "invoice_credit" and i["state"] == "intent" and i["attempts"] > 0:
            raise IssueFailed(f"an invoice credit of {fmt_money(i['amount_cents'])} may be partly on the next invoice "
                              "already: retry it as invoice credit (its events are idempotent) before refunding",
                              offer_other_method=True)


def _instances_text(case: Case) -> str:
    """The instance, or the instances of a case over several, within Polar's 500 characters."""
    text = case.instance_id or " ".join(case.instances)
    return text if len(text) <= 500 else text[:497] + "..."


def _iso(us: int) -> str:
    return from_us(us).strftime("%Y-%m-%dT%H:%M:%SZ")
