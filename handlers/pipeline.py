"""The case pipeline: the five steps of SPEC 2.2 over pieces of billed time. Pure: data in, case out.

Every step takes the pieces left by the one before and removes the ones it blames, so a billed
second is credited at most once, under the first kind that claims it. The steps walk the
instance's whole history (a run or a stop window may have begun before the checked periods);
only pieces of records in the checked periods are credited.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal
from typing import Iterable

from . import duplicates, stuck_instance, throttle, wrong_tier
from .model import KINDS, CaseInput, CaseResult, Claim, Finding, Piece, PriorCover
from .pieces import cut, merge_windows
from .timeline import (
    DAY_US, Time, add, allocate, day_of, day_start, fmt_duration, fmt_money, fmt_span, fmt_time, hours, hours_text, scale, td_us,
    to_cents,
)

EVIDENCE_RECORD_LINES = 25  # per finding; the record_ids list stays complete


@dataclass
class Walk:
    """The billed time after steps 1 to 3, which need no other instance's data."""

    case: CaseInput
    claims: dict[str, list[Claim]]
    headline: dict[str, list[str]]
    pieces: list[Piece]


def run_case(case: CaseInput) -> CaseResult:
    """All five steps, with case.org_intervals for the daily limit."""
    return finish(first_steps(case), case.org_intervals)


def days_for_daily_limit(walk: Walk) -> list[int]:
    """The UTC days (as day-start microseconds) on which the instance still has billed time in the
    checked periods after steps 1 to 3: the only days whose org total the daily limit needs."""
    if walk.case.throttle.daily_limit is None:
        return []
    days: set[int] = set()
    for p in walk.pieces:
        if p.record.billing_period in walk.case.periods:
            d = day_start(p.start)
            while d < p.end:
                days.add(d)
                d += DAY_US
    return sorted(days)


def first_steps(case: CaseInput) -> Walk:
    inst = case.instance
    thr = case.throttle
    claims: dict[str, list[Claim]] = {k: [] for k in KINDS}
    headline: dict[str, list[str]] = {k: [] for k in KINDS}

    # 1. duplicate_charge
    pieces, dup = duplicates.split_duplicates(case.records)
    for piece, first_id in dup:
        claims["duplicate_charge"].append(Claim(piece, piece.charge, f"record #{piece.record.id} duplicates #{first_id}"))

    # 2. stuck_instance
    windows = stuck_instance.stuck_windows(inst, case.pods, case.log_events, thr.idle_timeout)
    merged = merge_windows([w.as_tuple() for w in windows])
    pieces, stuck = cut(pieces, merged)
    for piece, reason in stuck:
        claims["stuck_instance"].append(Claim(piece, piece.charge, reason))

    # 3. throttle_continuous
    limit = td_us(thr.continuous_limit) if thr.continuous_limit is not None else None
    pieces, excess = throttle.continuous_excess(pieces, limit)
    for piece, run_start in excess:
        claims["throttle_continuous"].append(Claim(
            piece, piece.charge,
            f"run since {fmt_time(run_start)} passed the {fmt_duration(thr.continuous_limit)} continuous limit "
            f"at {fmt_time(run_start + limit)}"))

    return Walk(case, claims, headline, pieces)


def finish(walk: Walk, org_intervals) -> CaseResult:
    """Steps 4 and 5, the Polar duplicates of step 1, and the findings."""
    case, claims, headline, pieces = walk.case, walk.claims, walk.headline, walk.pieces
    inst, thr = case.instance, case.throttle
    notes: list[str] = []

    # 1b. extra metering events in Polar (they bill a record again; its pieces went on as usual)
    extra_credits = []
    if case.polar_events is not None:
        for x in duplicates.extra_polar_events(case.records, case.polar_events):
            extra_credits.append(x)
            headline["duplicate_charge"].append(
                f"Polar has {x.events} usage events for {fmt_span(x.record.start, x.record.end)} "
                f"but the database has {x.records} record(s): {x.extra} extra charge(s) of record #{x.record.id}")

    # 4. throttle_daily
    daily_limit = td_us(thr.daily_limit) if thr.daily_limit is not None else None
    pieces, excess_d = throttle.daily_excess(pieces, org_intervals, daily_limit)
    for piece, t in excess_d:
        claims["throttle_daily"].append(Claim(
            piece, piece.charge,
            f"org {inst.org_id} reached its {fmt_duration(thr.daily_limit)} daily limit at {fmt_time(t)}"))

    # 5. wrong_tier
    tier, tier_source = wrong_tier.true_tier(inst, case.pods, case.log_events)
    rate = case.rate_card.get(tier)
    in_scope_left = [p for p in pieces if p.record.billing_period in case.periods]
    if rate is None:
        notes.append(f"true tier {tier!r} ({tier_source}) is not on the rate card: tier pricing not checked")
    else:
        over, under = wrong_tier.price_pieces(in_scope_left, rate)
        for piece, diff in over:
            r = piece.record
            claims["wrong_tier"].append(Claim(
                piece, diff, f"billed {r.tier} at {r.rate_per_hour}/h, true tier {tier} costs {rate}/h"))
        headline["wrong_tier"] = [f"true tier {tier} ({tier_source}), rate card {tier} {rate}/h"]
        if to_cents(under) > 0:
            notes.append(f"undercharged by {fmt_money(to_cents(under))} at the {tier} rate: not credited, "
                         "nothing is collected back")

    findings, covered, credited_before, period_amounts = _findings(case, claims, headline, extra_credits)
    credit = sum(f.credit_cents for f in findings)

    systematic_reasons = _systematic(case, findings)
    return CaseResult(
        instance=inst,
        periods=list(case.periods),
        findings=findings,
        credit_cents=credit,
        required_level=0,  # set by the caller, which holds the level configuration
        systematic=bool(systematic_reasons),
        systematic_reasons=systematic_reasons,
        true_tier=tier,
        true_tier_source=tier_source,
        notes=notes,
        credited_before=credited_before,
        covered=covered,
        credit_by_period=allocate(credit, period_amounts),
    )


def _uncovered(piece: Piece, covers: list[PriorCover]) -> tuple[Time, set[int]]:
    """How much of a piece no issued case has credited yet, and the cases that did credit it."""
    covered = 0
    for start, end, _ in merge_windows([(c.start, c.end, c.case_id) for c in covers]):
        lo, hi = max(start, piece.start), min(end, piece.end)
        if hi > lo:
            covered += hi - lo
    cases = {c.case_id for c in covers if min(c.end, piece.end) > max(c.start, piece.start)}
    return piece.duration - covered, cases


def _findings(case: CaseInput, claims: dict[str, list[Claim]], headline: dict[str, list[str]],
              extra_credits: list) -> tuple[list[Finding], list[dict], list[dict]]:
    covers_by_record: dict[int, list[PriorCover]] = defaultdict(list)
    for c in case.prior_covers:
        covers_by_record[c.record_id].append(c)
    prior_cases_hit: set[int] = set()

    findings: list[Finding] = []
    covered: list[dict] = []
    period_amounts: dict[str, Decimal] = defaultdict(Decimal)
    for kind in KINDS:
        kind_periods: dict[str, Decimal] = defaultdict(Decimal)
        amount = Decimal(0)
        duration = 0
        duration_frac = 0
        record_ids: set[int] = set()
        lines: list[str] = []
        per_record: dict[int, list[Claim]] = defaultdict(list)
        for claim in claims[kind]:
            if claim.piece.record.billing_period not in case.periods:
                continue
            credit = claim.credit
            prior = covers_by_record.get(claim.piece.record.id)
            if prior:
                left, hit = _uncovered(claim.piece, prior)
                prior_cases_hit |= hit
                if left <= 0:
                    continue
                credit = scale(credit, left, claim.piece.duration)
            amount = add(amount, credit)
            kind_periods[claim.piece.record.billing_period] += credit
            d = claim.piece.duration
            if type(d) is int:
                duration += d
            else:  # a piece cut at the daily-limit moment: keep Fraction sums rare
                duration_frac += d
            per_record[claim.piece.record.id].append(claim)
            covered.append({"kind": kind, "record_id": claim.piece.record.id,
                            "start": int(claim.piece.start), "end": _ceil(claim.piece.end), "extra_events": 0})
        if kind == "duplicate_charge":
            for x in extra_credits:
                if x.record.billing_period not in case.periods:
                    continue
                already = sum(c.extra_events for c in covers_by_record.get(x.record.id, []))
                if already:
                    prior_cases_hit |= {c.case_id for c in covers_by_record[x.record.id] if c.extra_events}
                n = x.extra - already
                if n <= 0:
                    continue
                amount = add(amount, scale(x.record.total_charge, n, 1))
                kind_periods[x.record.billing_period] += scale(x.record.total_charge, n, 1)
                duration += x.record.seconds_us * n
                record_ids.add(x.record.id)
                covered.append({"kind": kind, "record_id": x.record.id, "start": x.record.start,
                                "end": x.record.end, "extra_events": n})
        record_ids |= set(per_record)
        duration = duration + duration_frac
        cents = to_cents(amount)
        if cents <= 0:
            continue
        for period, part in allocate(cents, kind_periods).items():
            period_amounts[period] += part
        lines.extend(headline.get(kind, []))
        reasons = sorted({c.because for cl in per_record.values() for c in cl})
        if len(reasons) <= 6:  # few distinct reasons: state each once, above the records
            lines.extend(r for r in reasons if r not in lines)
        for rid in sorted(per_record)[:EVIDENCE_RECORD_LINES]:
            cl = per_record[rid]
            r = cl[0].piece.record
            spans = ", ".join(fmt_span(c.piece.start, c.piece.end) for c in cl[:3])
            more = f" and {len(cl) - 3} more spans" if len(cl) > 3 else ""
            why = "" if cl[0].because in lines else f" — {cl[0].because}"
            lines.append(f"record #{rid} ({fmt_span(r.start, r.end)}, {r.tier}, ${_money(r.total_charge)}): "
                         f"{spans}{more}{why}")
        if len(per_record) > EVIDENCE_RECORD_LINES:
            lines.append(f"…and {len(per_record) - EVIDENCE_RECORD_LINES} more records")
        findings.append(Finding(
            kind=kind, credit_cents=cents, hours=hours(duration), summary=_summary(kind, case, duration, cents),
            evidence=lines, record_ids=sorted(record_ids), amount=amount))

    credited_before = [
        {"case_id": pc.case_id, "credit_cents": pc.credit_cents, "kinds": list(pc.kinds), "state": pc.state,
         "text": (f"credited before: {fmt_money(pc.credit_cents)} in case {pc.case_id}" if pc.state == "issued"
                  else f"held by case {pc.case_id} ({pc.state}, {fmt_money(pc.credit_cents)}): not credited again")}
        for pc in case.prior_cases if pc.case_id in prior_cases_hit
    ]
    return findings, covered, credited_before, period_amounts


def _money(amount: Decimal) -> str:
    """A charge as stored (numeric 12,4) without trailing zeros past the cents: 4.16, 0.1245."""
    text = f"{amount.normalize():f}"
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


def _ceil(t) -> int:
    i = int(t)
    return i if i == t else i + 1


def _summary(kind: str, case: CaseInput, duration, cents: int) -> str:
    h = hours_text(hours(duration)).rstrip("0").rstrip(".")
    thr = case.throttle
    return {
        "duplicate_charge": f"{h} h billed more than once: {fmt_money(cents)}",
        "stuck_instance": f"{h} h billed while the instance was stopped, paused or idle: {fmt_money(cents)}",
        "throttle_continuous": f"{h} h billed past the {fmt_duration(thr.continuous_limit)} continuous limit: {fmt_money(cents)}",
        "throttle_daily": f"{h} h billed past the org's {fmt_duration(thr.daily_limit)} daily limit: {fmt_money(cents)}",
        "wrong_tier": f"{h} h charged above the true tier's rate: {fmt_money(cents)}",
    }[kind]


def _systematic(case: CaseInput, findings: Iterable[Finding]) -> list[str]:
    """SPEC 2.4: the mechanism failed for this instance in the checked periods, or the latest
    reconciliation saw the same kind for enough customers."""
    reasons = []
    for ev in sorted(case.log_events, key=lambda e: e.at):
        if ev.instance_id != case.instance.instance_id or ev.kind not in ("pause_failed", "reap_failed"):
            continue
        if _period_of(ev.at) in case.periods:
            what = "throttle failed to pause" if ev.kind == "pause_failed" else "idle reaper failed to delete"
            reasons.append(f"{what} {ev.instance_id} at {fmt_time(ev.at)}: {ev.detail}")
    for f in findings:
        n = case.systematic_kinds.get(f.kind, 0)
        if n >= case.systematic_min_customers:
            reasons.append(f"latest reconciliation found {f.kind} for {n} customers in the same period")
    return reasons


def _period_of(t: int) -> str:
    return day_of(t).strftime("%Y-%m")
