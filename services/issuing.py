"""Issue an approved case's credit in Polar exactly once (SPEC 4).

Exactly once, whatever happens:
- one worker per case: the case moves approved -> issuing atomically, and the work runs under a
  PostgreSQL advisory lock on the case, so a double click, two approvers or two replicas never
  issue side by side;
- the intent is written to the outbox (`issuances`, unique per case and order) before any call;
- refunds have no idempotency key in Polar, so before every POST, and after any timeout, 5xx or
  lost response, the order's refunds are read back (`GET /v1/refunds/?order_id=`) and a refund
  whose metadata.case_id is this case counts as done;
- a restart resumes every case left approved or issuing (`resume_unfinished`);
- `invoice_credit` events carry an external_id derived from the case, and Polar deduplicates on it.
The case ends issued (a billing_corrections row in the same transaction) or failed with a reason.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Protocol

from handlers.timeline import allocate, fmt_money, from_us
from services.config import Config
from services.polar import PolarClient, PolarError, PolarUnavailable
from services.store import CaseStore, Outbox

log = logging.getLogger(__name__)
LOCK_SPACE = 7_242_002
REFUND_POST_ATTEMPTS = 3


class IssueFailed(Exception):
    pass


class NotInvoiced(IssueFailed):
    pass


class Notifier(Protocol):
    async def issued(self, case: dict, refs: list[str], remainder_cents: int) -> None: ...

    async def failed(self, case: dict, reason: str, offer_invoice_credit: bool) -> None: ...


@dataclass
class Issuer:
    cases: CaseStore
    polar: PolarClient
    config: Config
    notifier: Notifier
    lookup_delay_s: float = 0.5
    _tasks: set = field(default_factory=set)

    @property
    def outbox(self) -> Outbox:
        return Outbox(self.cases)

    async def submit(self, case_id: int) -> None:
        """Start issuing in the background; Slack's request returns at once."""
        task = asyncio.create_task(self.issue(case_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def resume_unfinished(self, older_than_s: float = 0) -> list[int]:
        """Cases a crash or restart left approved or issuing, and issued cases not yet announced."""
        async with self.cases.db.pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT id FROM {self.cases.s}.cases WHERE (state IN ('approved', 'issuing')"
                f" OR (state = 'issued' AND NOT notified)) AND updated_at <= now() - %s * interval '1 second'"
                " ORDER BY id", (older_than_s,))
            ids = [r["id"] for r in await cur.fetchall()]
        for case_id in ids:
            await self.issue(case_id)
        return ids

    async def issue(self, case_id: int) -> dict | None:
        async with self.cases.db.pool.connection() as lock_conn:
            await lock_conn.set_autocommit(True)
            cur = await lock_conn.execute("SELECT pg_try_advisory_lock(%s, %s) AS ok", (LOCK_SPACE, case_id))
            if not (await cur.fetchone())["ok"]:
                return None  # another worker holds this case
            try:
                return await self._issue_locked(case_id)
            finally:
                await lock_conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_SPACE, case_id))

    async def _issue_locked(self, case_id: int) -> dict | None:
        case = await self.cases.get(case_id)
        if case is None:
            return None
        if case["state"] == "issued" and not case["notified"]:
            await self._announce(case)
            return case
        if case["state"] == "approved":
            case = await self.cases.transition(case_id, ("approved",), "issuing", "billing-bot", "issuing",
                                               {"method": case["method"]})
            if case is None:
                return None
        elif case["state"] != "issuing":
            return None
        try:
            if case["method"] == "invoice_credit":
                refs, issued, remainder = await self._invoice_credit(case)
            else:
                refs, issued, remainder = await self._refunds(case)
        except IssueFailed as exc:
            return await self._fail(case, str(exc), offer_invoice_credit=isinstance(exc, NotInvoiced))
        except Exception as exc:  # a bug or an outage: fail loudly, keep the outbox for the retry
            log.exception("issuing case %s failed", case_id)
            return await self._fail(case, f"{type(exc).__name__}: {exc}", offer_invoice_credit=False)
        done = await self._finalize(case, refs, issued, remainder)
        if done is not None:
            await self._announce(done)
        return done

    # --- refunds ---------------------------------------------------------------------------------

    def _split(self, case: dict) -> dict[str, int]:
        by_period = {p: Decimal(c) for p, c in (case["report"].get("credit_by_period") or {}).items()}
        if not by_period:
            by_period = {max(case["periods"]): Decimal(1)}
        return allocate(case["credit_cents"], by_period)

    async def _refunds(self, case: dict) -> tuple[list[str], int, int]:
        split = self._split(case)
        orders = await self.polar.orders(case["customer_id"])
        plan = []
        missing = []
        for period, cents in sorted(split.items()):
            order = invoicing_order(orders, period)
            if order is None:
                missing.append(period)
            else:
                plan.append((period, order, cents))
        if missing:
            raise NotInvoiced(f"{', '.join(missing)} not invoiced yet, so there is no order to refund. "
                              "Issue it as invoice credit instead (it appears on the next invoice).")
        reason = "duplicate" if set(case["kinds"]) == {"duplicate_charge"} else "service_disruption"
        intents = {i["target"]: i for i in await self.outbox.for_case(case["id"])}
        refs, issued, remainder = [], 0, 0
        for period, order, cents in plan:
            intent = intents.get(order["id"])
            if intent is None:  # first run: cap at what the order can still refund
                amount = min(cents, int(order["refundable_amount"]))
                if amount <= 0:
                    remainder += cents
                    continue
                intent = await self.outbox.intend(case["id"], "refund", order["id"], period, amount)
            amount = intent["amount_cents"]  # a resumed run keeps the amount it meant to refund
            remainder += cents - amount
            if intent["state"] == "confirmed":
                refs.append(intent["polar_ref"])
            else:
                refs.append(await self._refund_once(case, intent, order, period, amount, reason))
            issued += amount
        return refs, issued, remainder

    async def _find_refund(self, order_id: str, case_id: int) -> dict | None:
        for refund in await self.polar.refunds_for_order(order_id):
            if str((refund.get("metadata") or {}).get("case_id")) == str(case_id) and refund.get("status") != "failed":
                return refund
        return None

    async def _refund_once(self, case: dict, intent: dict, order: dict, period: str, amount: int, reason: str) -> str:
        """One refund for (case, order): found, or created; never two."""
        found = await self._find_refund(order["id"], case["id"])
        if found:
            await self.outbox.confirm(intent["id"], found["id"])
            return found["id"]
        metadata = {"case_id": str(case["id"]), "instance_id": case["instance_id"], "period": period}
        if case.get("ticket_id"):
            metadata["ticket_id"] = case["ticket_id"]
        body = {"order_id": order["id"], "amount": amount, "reason": reason, "metadata": metadata,
                "comment": f"billing-bot case {case['id']}: {', '.join(case['kinds'])}", "revoke_benefits": False}
        last = ""
        for attempt in range(REFUND_POST_ATTEMPTS):
            await self.outbox.attempt(intent["id"])
            try:
                refund = await self.polar.create_refund(body)
            except PolarUnavailable as exc:
                last = str(exc)
                await self.outbox.note_error(intent["id"], last)
                # the refund may have been made: read it back before any new POST
                await asyncio.sleep(max(exc.retry_after or 0, self.lookup_delay_s))
                found = await self._find_refund(order["id"], case["id"])
                if found:
                    await self.outbox.confirm(intent["id"], found["id"])
                    return found["id"]
                continue
            except PolarError as exc:
                await self.outbox.fail(intent["id"], str(exc))
                raise IssueFailed(f"Polar refused the refund on order {order['id']} ({period}): "
                                  f"{exc.error}: {exc.detail}") from exc
            await self.outbox.confirm(intent["id"], refund["id"])
            return refund["id"]
        raise IssueFailed(f"Polar did not confirm the refund on order {order['id']} after "
                          f"{REFUND_POST_ATTEMPTS} attempts ({last}), and none is on the order: safe to retry")

    # --- invoice credit --------------------------------------------------------------------------

    async def _invoice_credit(self, case: dict) -> tuple[list[str], int, int]:
        target = f"billing-bot-case-{case['id']}"
        intent = await self.outbox.intend(case["id"], "invoice_credit", target, None, case["credit_cents"])
        if intent["state"] == "confirmed":
            return [intent["polar_ref"]], case["credit_cents"], 0
        events = await self._compensating_events(case, target)
        for i in range(0, len(events), 100):
            await self.polar.ingest_events(events[i:i + 100])  # retried: external_id makes it harmless
        await self.outbox.confirm(intent["id"], f"{len(events)} usage events {target}-*")
        return [f"{len(events)} compensating usage events ({target}-*)"], case["credit_cents"], 0

    async def _compensating_events(self, case: dict, prefix: str) -> list[dict]:
        s = self.cases.s
        async with self.cases.db.pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT p.kind, p.record_id, p.start_us, p.end_us, p.extra_events, r.tier"
                f" FROM {s}.case_pieces p JOIN billing_records r ON r.id = p.record_id"
                " WHERE p.case_id = %s ORDER BY p.record_id, p.start_us", (case["id"],))
            pieces = await cur.fetchall()
        share = Decimal(case["credit_cents"]) / Decimal(case["proposed_cents"] or 1)
        true_tier = case["report"].get("true_tier")
        name = self.config.polar.usage_event_name
        events = []
        for i, p in enumerate(pieces):
            hours = Decimal(p["end_us"] - p["start_us"]) / Decimal(3_600_000_000) * max(p["extra_events"], 1) * share
            h = float(round(hours, 6))  # a quantity of hours for Polar's meter, not money
            meta = {"org_id": case["org_id"], "instance_id": case["instance_id"], "record_id": p["record_id"],
                    "start_time": _iso(p["start_us"]), "end_time": _iso(p["end_us"]), "case_id": str(case["id"])}
            events.append({"name": name, "external_customer_id": case["customer_id"], "external_id": f"{prefix}-{i}-neg",
                           "metadata": {**meta, "tier": p["tier"], "hours": -h}})
            if p["kind"] == "wrong_tier" and true_tier:
                events.append({"name": name, "external_customer_id": case["customer_id"],
                               "external_id": f"{prefix}-{i}-pos", "metadata": {**meta, "tier": true_tier, "hours": h}})
        return events

    # --- endings ---------------------------------------------------------------------------------

    async def _finalize(self, case: dict, refs: list[str], issued: int, remainder: int) -> dict | None:
        """issuing -> issued and the billing_corrections row, in one transaction."""
        kinds = case["report"]["findings"]
        leading = max(kinds, key=lambda f: f["credit_cents"])["kind"] if kinds else "duplicate_charge"
        notes = (f"billing-bot case {case['id']} ({case['instance_id']}, {', '.join(case['periods'])}); "
                 f"method {case['method']}; Polar: {', '.join(refs)}; root cause: "
                 + "; ".join(f"{f['kind']} {fmt_money(f['credit_cents'])}: {f['summary']}" for f in kinds))
        if remainder:
            notes += f"; {fmt_money(remainder)} not refundable on the order, left for a lead"
        s = self.cases.s
        async with self.cases.db.pool.connection() as conn:
            async with conn.transaction():
                cur = await conn.execute(
                    f"UPDATE {s}.cases SET state = 'issued', issued_cents = %s, polar_reference = %s,"
                    " remainder_cents = %s, issued_at = now(), updated_at = now() WHERE id = %s AND state = 'issuing'"
                    " RETURNING *", (issued, ", ".join(refs), remainder, case["id"]))
                row = await cur.fetchone()
                if row is None:
                    return None
                await conn.execute(
                    "INSERT INTO billing_corrections (customer_id, ticket_id, issue_type, credit_amount, resolved_by,"
                    " resolved_at, notes) VALUES (%s, %s, %s, %s, %s, now(), %s)",
                    (case["customer_id"], case.get("ticket_id"), leading, Decimal(issued) / 100,
                     case["decided_by"] or "billing-bot", notes))
                await self.cases._event(conn, case["id"], "billing-bot", "issued",
                                        {"issued_cents": issued, "refs": refs, "remainder_cents": remainder})
        return row

    async def _announce(self, case: dict) -> None:
        refs = [r for r in (case.get("polar_reference") or "").split(", ") if r]
        await self.notifier.issued(case, refs, case.get("remainder_cents") or 0)
        async with self.cases.db.pool.connection() as conn:
            await conn.execute(f"UPDATE {self.cases.s}.cases SET notified = true WHERE id = %s", (case["id"],))

    async def _fail(self, case: dict, reason: str, offer_invoice_credit: bool) -> dict | None:
        row = await self.cases.transition(case["id"], ("issuing",), "failed", "billing-bot", "failed",
                                          {"reason": reason}, reason=reason)
        if row is not None:
            await self.notifier.failed(row, reason, offer_invoice_credit)
        return row


def invoicing_order(orders: list[dict], period: str) -> dict | None:
    """The customer's earliest subscription_cycle order created on or after the first day of the
    month after the period (SPEC 4)."""
    y, m = int(period[:4]), int(period[5:7])
    first_next = datetime(y + (m == 12), m % 12 + 1, 1, tzinfo=timezone.utc)
    candidates = [o for o in orders if o.get("billing_reason") == "subscription_cycle"
                  and _parse(o["created_at"]) >= first_next]
    return min(candidates, key=lambda o: _parse(o["created_at"])) if candidates else None


def _parse(text: str) -> datetime:
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def _iso(us: int) -> str:
    return from_us(us).strftime("%Y-%m-%dT%H:%M:%SZ")
