"""The bot's own books (issue 13): every credit the bot claims in `billing_corrections` is money
Polar confirms, and every refund Polar made for a bot case belongs to an issued case. Pure:
rows and Polar objects in, anomalies of kind `credit_mismatch` out.

Money that counts as moved, per case:
- refunds carrying `metadata.case_id` = the case with status `succeeded` (a pending, failed or
  canceled refund moved nothing; a succeeded one later reverted reads failed or canceled);
- the case's confirmed `invoice_credit` issuances, when Polar holds usage events carrying
  `metadata.case_id` = the case (their amount is the issuance's: events carry hours, not cents).
A case switched from refund to invoice credit part way is covered by the sum of both.

A `billing_corrections` row belongs to a case through its notes, which issuing starts with
`billing-bot case <id> ` (`correction_case_id`); rows without that are people's own corrections
and are not the bot's to judge.
"""
from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Decimal
from typing import Iterable, Mapping

from .timeline import fmt_money

KIND = "credit_mismatch"
_CASE_NOTE = re.compile(r"^billing-bot case (\d+)\b")
# a case in one of these states may still move money; a pending refund for any other is suspect
_OPEN_STATES = ("approved", "issuing", "issued")


def correction_case_id(notes: str | None) -> int | None:
    """The bot case a billing_corrections row was written for, from its notes."""
    m = _CASE_NOTE.match(notes or "")
    return int(m.group(1)) if m else None


def credit_cents(amount) -> int:
    """billing_corrections.credit_amount (numeric(12,2) dollars) as integer cents."""
    return int((Decimal(str(amount)) * 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _case_key(value) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


def credit_mismatches(corrections: Iterable[Mapping], cases: Iterable[Mapping], refunds: Iterable[Mapping],
                      ingested: Mapping[int, list], *, known_cases: Mapping[int, str] | None = None) -> list[dict]:
    """Anomalies (dicts shaped as SPEC 5.2's, kind credit_mismatch, plus case_id, claimed_cents and
    confirmed_cents), ordered by case.

    corrections: the day's billing_corrections rows (id, customer_id, credit_amount, notes).
    cases: the day's issued cases (id, customer_id, state, issued_cents, method, polar_reference,
      optionally instance_id and org_id), each with `issuances` (method, target, amount_cents,
      state, polar_ref).
    refunds: Polar's refunds (as `GET /v1/refunds/` lists them) on the orders those cases refunded.
    ingested: case id -> Polar's events carrying metadata.case_id, for cases with invoice credit.
    known_cases: case id -> state, for other cases that refunds or rows name (any day).
    """
    day_cases = {int(c["id"]): c for c in cases}
    issued = {cid: c for cid, c in day_cases.items() if c.get("state") == "issued"}
    states = {**{int(k): v for k, v in (known_cases or {}).items()},
              **{cid: c.get("state") for cid, c in day_cases.items()}}
    unique_refunds = list({r["id"]: r for r in refunds}.values())
    by_case: dict[int, list[Mapping]] = {}
    for r in unique_refunds:
        cid = _case_key((r.get("metadata") or {}).get("case_id"))
        if cid is not None:
            by_case.setdefault(cid, []).append(r)
    rows_by_case: dict[int, list[Mapping]] = {}
    for row in corrections:
        cid = correction_case_id(row.get("notes"))
        if cid is not None:
            rows_by_case.setdefault(cid, []).append(row)

    out: list[dict] = []
    for cid, case in sorted(issued.items()):
        out.extend(_check_case(case, rows_by_case.get(cid, []), by_case.get(cid, []), ingested.get(cid) or []))

    for cid, rows in sorted(rows_by_case.items()):
        if cid in issued:
            continue
        claimed = sum(credit_cents(r["credit_amount"]) for r in rows)
        state = states.get(cid)
        out.append(_anomaly(cid, rows[0].get("customer_id"), None, claimed, 0,
                            f"billing_corrections row {', '.join(str(r['id']) for r in rows)} claims "
                            f"{fmt_money(claimed)} for case {cid}, which is "
                            f"{_state_words(state)}, not issued that day"))

    for r in unique_refunds:
        raw = (r.get("metadata") or {}).get("case_id")
        if raw is None:
            continue  # Polar's own refund, or a person's: not a credit the bot claims
        cid = _case_key(raw)
        state = states.get(cid) if cid is not None else None
        if r.get("status") == "succeeded" and state != "issued":
            out.append(_anomaly(cid if cid is not None else str(raw), None, None, 0, int(r["amount"]),
                                f"Polar refunded {fmt_money(int(r['amount']))} (refund {r['id']}, order "
                                f"{r.get('order_id')}) for case {raw}, which is {_state_words(state)}: money "
                                "moved that no issued case accounts for"))
        elif r.get("status") == "pending" and state not in _OPEN_STATES:
            out.append(_anomaly(cid if cid is not None else str(raw), None, None, 0, 0,
                                f"refund {r['id']} of {fmt_money(int(r['amount']))} (order {r.get('order_id')}) "
                                f"is pending for case {raw}, which is {_state_words(state)}: it may still move "
                                "money no case will account for"))
    out.sort(key=lambda a: (str(a["case_id"]), a["detail"]))
    return out


def _check_case(case: Mapping, rows: list[Mapping], refunds: list[Mapping], events: list) -> list[dict]:
    cid = int(case["id"])
    claimed = sum(credit_cents(r["credit_amount"]) for r in rows)
    refunded = sum(int(r["amount"]) for r in refunds if r.get("status") == "succeeded")
    invoiced = sum(int(i["amount_cents"]) for i in case.get("issuances") or ()
                   if i.get("method") == "invoice_credit" and i.get("state") == "confirmed")
    confirmed = refunded + (invoiced if events else 0)
    problems = []
    if not rows:
        problems.append("issued, but no billing_corrections row")
    elif len(rows) > 1:
        problems.append(f"{len(rows)} billing_corrections rows ({', '.join(str(r['id']) for r in rows)}) for one case")
    if rows and claimed != confirmed:
        problems.append(f"billing_corrections says {fmt_money(claimed)}, Polar confirms {fmt_money(confirmed)}")
    issued_cents = case.get("issued_cents")
    if issued_cents is not None and int(issued_cents) != confirmed and (not rows or int(issued_cents) != claimed):
        problems.append(f"the case says {fmt_money(int(issued_cents))} issued")
    if invoiced and not events:
        problems.append(f"invoice credit of {fmt_money(invoiced)} recorded, but Polar has no usage events for the case")
    if not problems:
        return []
    unsettled = [f"refund {r['id']} {r.get('status')} {fmt_money(int(r['amount']))}"
                 for r in refunds if r.get("status") != "succeeded"]
    if unsettled:
        problems.append("not money: " + ", ".join(unsettled))
    return [_anomaly(cid, case.get("customer_id"), case, claimed, confirmed, "; ".join(problems))]


def _anomaly(case_id, customer_id, case: Mapping | None, claimed: int, confirmed: int, detail: str) -> dict:
    # overcharge_cents is 0: this is the bot's bookkeeping, not a charge to the customer, and the
    # reconciliation's totals of overcharges must not count it (as charge_mismatch carries 0)
    return {"kind": KIND, "case_id": case_id, "instance_id": (case or {}).get("instance_id"),
            "org_id": (case or {}).get("org_id"), "customer_id": customer_id, "record_ids": [],
            "overcharge_cents": 0, "claimed_cents": claimed, "confirmed_cents": confirmed, "detail": detail}


def _state_words(state: str | None) -> str:
    return f"{state}" if state else "not a case the bot knows"
