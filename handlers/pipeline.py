"""The case pipeline: the five steps of SPEC 2.2 over pieces of billed time. Pure: data in, case out.

Every step takes the pieces left by the one before and removes the ones it blames, so a billed
second is credited at most once, under the first kind that claims it. The steps walk the
instance's whole history (a run or a stop window may have begun before the checked periods);
only pieces of records in the checked periods are credited.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import time as dt_time, timedelta
from decimal import Decimal
from typing import Iterable

from . import duplicates, stuck_instance, throttle, wrong_tier
from .model import KINDS, CheckInput, CheckResult, Claim, Finding, Piece, PriorCover
from .pieces import cut, merge_windows
from .throttle import RUN_GAP_US
from .timeline import (
    DAY_US, Time, add, allocate, day_of, day_start, fmt_duration, fmt_money, fmt_time, from_us, hours, hours_text, scale,
    td_us, to_cents,
)

EVIDENCE_STRETCH_LINES = 12  # per finding; the record_ids list stays complete


@dataclass
class Walk:
    """The billed time after steps 1 to 3, which need no other instance's data."""

    case: CheckInput
    claims: dict[str, list[Claim]]
    headline: dict[str, list[str]]
    pieces: list[Piece]


def run_case(case: CheckInput) -> CheckResult:
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


def first_steps(case: CheckInput) -> Walk:
    inst = case.instance
    thr = case.throttle
    claims: dict[str, list[Claim]] = {k: [] for k in KINDS}
    headline: dict[str, list[str]] = {k: [] for k in KINDS}

    # 1. duplicate_charge
    pieces, dup = duplicates.split_duplicates(case.records)
    for piece, first_id in dup:
        claims["duplicate_charge"].append(DupClaim(piece, piece.charge, f"record #{piece.record.id} duplicates #{first_id}",
                                                   first_id))

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
            f"running without a pause since {fmt_time(run_start)}: the {fmt_duration(thr.continuous_limit)} "
            f"continuous limit was reached at {fmt_time(run_start + limit)}, when it should have been paused"))

    return Walk(case, claims, headline, pieces)


def finish(walk: Walk, org_intervals) -> CheckResult:
    """Steps 4 and 5, the Polar duplicates of step 1, and the findings."""
    case, claims, headline, pieces = walk.case, walk.claims, walk.headline, walk.pieces
    inst, thr = case.instance, case.throttle
    notes: list[str] = []

    # 1b. extra metering events in Polar (they bill a record again; its pieces went on as usual)
    extra_credits = []
    if case.polar_events is not None:
        # their evidence lines are written in _findings, which knows which of them this case credits
        extra_credits.extend(duplicates.extra_polar_events(case.records, case.polar_events))

    # 4. throttle_daily
    daily_limit = td_us(thr.daily_limit) if thr.daily_limit is not None else None
    pieces, excess_d = throttle.daily_excess(pieces, org_intervals, daily_limit)
    for piece, t in excess_d:
        claims["throttle_daily"].append(Claim(
            piece, piece.charge,
            f"org {inst.org_id} reached its {fmt_duration(thr.daily_limit)} daily limit at {fmt_time(t)}, "
            "when the instance should have been paused"))

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
                piece, diff, f"billed as {r.tier} at {_rate(r.rate_per_hour)}; {tier} costs {_rate(rate)}"))
        headline["wrong_tier"] = [f"true tier {tier} ({tier_source}): {_rate(rate)} on the rate card"]
        if to_cents(under) > 0:
            notes.append(f"undercharged by {fmt_money(to_cents(under))} at the {tier} rate: not credited, "
                         "nothing is collected back")

    findings, covered, credited_before, period_amounts = _findings(case, claims, headline, extra_credits)
    credit = sum(f.credit_cents for f in findings)

    systematic_reasons = _systematic(case, findings)
    return CheckResult(
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


def _findings(case: CheckInput, claims: dict[str, list[Claim]], headline: dict[str, list[str]],
              extra_credits: list) -> tuple[list[Finding], list[dict], list[dict]]:
    covers_by_record: dict[int, list[PriorCover]] = defaultdict(list)
    for c in case.prior_covers:
        covers_by_record[c.record_id].append(c)
    prior_cases_hit: set[int] = set()
    by_id = {r.id: r for r in case.records}

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
        credited: list[Claim] = []  # the claims this finding credits, for the evidence lines
        extra_events = 0
        polar_lines: list[str] = []  # extra metering events of records in the checked periods
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
            credited.append(claim)
            record_ids.add(claim.piece.record.id)
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
                polar_lines.append(
                    f"extra metering: Polar has {x.events} usage events for {_span(x.record.start, x.record.end)} "
                    f"but the database has {_n(x.records, 'record')}: {_n(x.extra, 'extra charge')} of record "
                    f"#{x.record.id}" + (f" ({already} credited before)" if already else ""))
                if n <= 0:
                    continue
                amount = add(amount, scale(x.record.total_charge, n, 1))
                kind_periods[x.record.billing_period] += scale(x.record.total_charge, n, 1)
                duration += x.record.seconds_us * n
                extra_events += n
                record_ids.add(x.record.id)
                covered.append({"kind": kind, "record_id": x.record.id, "start": x.record.start,
                                "end": x.record.end, "extra_events": n})
        duration = duration + duration_frac
        cents = to_cents(amount)
        if cents <= 0:
            continue
        for period, part in allocate(cents, kind_periods).items():
            period_amounts[period] += part
        lines.extend(headline.get(kind, []))
        lines.extend(polar_lines)
        lines.extend(_evidence_lines(credited, by_id))
        findings.append(Finding(
            kind=kind, credit_cents=cents, hours=hours(duration),
            summary=_summary(kind, case, duration, cents, credited, by_id, extra_events),
            evidence=lines, record_ids=sorted(record_ids), amount=amount))

    credited_before = [
        {"case_id": pc.case_id, "credit_cents": pc.credit_cents, "kinds": list(pc.kinds), "state": pc.state,
         "text": (f"credited before: {fmt_money(pc.credit_cents)} in case {pc.case_id}" if pc.state == "issued"
                  else f"held by case {pc.case_id} ({pc.state}, {fmt_money(pc.credit_cents)}): not credited again")}
        for pc in case.prior_cases if pc.case_id in prior_cases_hit
    ]
    return findings, covered, credited_before, period_amounts


# --- evidence text -------------------------------------------------------------------------------
# One line per stretch of billed time with the same reason, not one per record: a day of hourly
# records stuck after a pod ended is one line ("records #1001-#1024, 10-05 00:00–24:00 UTC, 24 h:
# pod ... terminated ..."). The record_ids list stays complete; the lines only summarise.

@dataclass
class DupClaim(Claim):
    """A duplicate piece with the record that billed its time first (the evidence names it)."""

    first_id: int = 0


@dataclass
class _Stretch:
    key: tuple
    start: Time
    end: Time
    ids: list[int]
    firsts: list[int]
    duration: Time
    reason: str


def _dup_kind(claim: Claim, by_id: dict) -> str:
    """'exact duplicate' when the piece is the whole record and the first record billed the very
    same interval; otherwise 'partial overlap' (SPEC 5.2 keeps the same two names apart)."""
    r = claim.piece.record
    first = by_id.get(getattr(claim, "first_id", None))
    whole = claim.piece.start == r.start and claim.piece.end == r.end
    if whole and first is not None and (first.start, first.end) == (r.start, r.end):
        return "exact duplicate"
    return "partial overlap"


def _stretches(claims: list[Claim], by_id: dict) -> list[_Stretch]:
    out: list[_Stretch] = []
    for c in sorted(claims, key=lambda c: (c.piece.start, c.piece.record.id)):
        rid = c.piece.record.id
        if isinstance(c, DupClaim):
            key: tuple = ("dup", _dup_kind(c, by_id))
        else:
            key = ("why", c.because)
        last = out[-1] if out else None
        # contiguous (a gap of up to 60 s continues, as it does a run) and for the same reason
        if last is not None and last.key == key and c.piece.start <= last.end + RUN_GAP_US:
            last.end = max(last.end, c.piece.end)
            last.duration += c.piece.duration
            # repeats are harmless (id_ranges takes the set); a membership test would be quadratic
            # on a stretch of 20,000 hourly records
            if last.ids[-1] != rid:
                last.ids.append(rid)
            if isinstance(c, DupClaim) and (not last.firsts or last.firsts[-1] != c.first_id):
                last.firsts.append(c.first_id)
        else:
            out.append(_Stretch(key, c.piece.start, c.piece.end, [rid],
                                [c.first_id] if isinstance(c, DupClaim) else [], c.piece.duration, c.because))
    return out


def _evidence_lines(claims: list[Claim], by_id: dict) -> list[str]:
    stretches = _stretches(claims, by_id)
    lines = []
    for st in stretches[:EVIDENCE_STRETCH_LINES]:
        where = f"{_span(st.start, st.end)}, {_hours(st.duration)} h"
        if st.key[0] == "dup":
            what = st.key[1]
            plural = len(st.ids) > 1
            verb = ("duplicate" if plural else "duplicates") if what == "exact duplicate" else ("overlap" if plural else "overlaps")
            own = ""
            if not plural and what == "partial overlap":
                r = by_id[st.ids[0]]
                own = f" (billed {_span(r.start, r.end)})"
            lines.append(f"{what}{'s' if plural else ''}: {id_ranges(st.ids)}{own} {verb} {id_ranges(st.firsts, bare=True)}, {where}")
        else:
            lines.append(f"{id_ranges(st.ids)}, {where}: {st.reason}")
    rest = stretches[EVIDENCE_STRETCH_LINES:]
    if rest:
        ids = sorted({i for st in rest for i in st.ids})
        lines.append(f"…and {len(rest)} more stretches ({_hours(sum(st.duration for st in rest))} h, {id_ranges(ids)})")
    return lines


def id_ranges(ids: list[int], bare: bool = False) -> str:
    """'record #7', 'records #1001-#1024, #1030': consecutive ids as ranges, long lists shortened
    (the finding's record_ids has them all)."""
    ids = sorted(set(ids))
    ranges: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        ranges.append(f"#{ids[i]}" if i == j else f"#{ids[i]}-#{ids[j]}")
        i = j + 1
    if len(ranges) > 6:
        ranges = ranges[:4] + ["…", ranges[-1]]
        text = ", ".join(ranges) + f" ({len(ids)} records)"
    else:
        text = ", ".join(ranges)
    if bare:
        return text
    return ("record " if len(ids) == 1 else "records ") + text


def _clock(t: Time) -> str:
    dt = from_us(t)
    return dt.strftime("%H:%M:%S" if dt.second or dt.microsecond else "%H:%M")


def _span(start: Time, end: Time) -> str:
    """'10-05 08:00–10:00 UTC'; a stretch ending at the next midnight ends at 24:00."""
    a, b = from_us(start), from_us(end)
    left = f"{a.strftime('%m-%d')} {_clock(start)}"
    if a.date() == b.date():
        right = _clock(end)
    elif b.time() == dt_time(0) and b.date() - a.date() == timedelta(days=1):
        right = "24:00"
    else:
        right = f"{b.strftime('%m-%d')} {_clock(end)}"
    return f"{left}–{right} UTC"


def _hours(duration: Time) -> str:
    """Hours for people: '24', '1.5', '0.25' (the JSON keeps four places)."""
    return hours_text(hours(duration)).rstrip("0").rstrip(".")


def _rate(rate: Decimal) -> str:
    """A rate as the card states it: '$2.08/h', '$0.083/h' (numeric(10,4)'s trailing zeros dropped)."""
    return f"${_money(rate)}/h"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _money(amount: Decimal) -> str:
    """An amount without trailing zeros past the cents: 4.16, 0.083, 2.08."""
    text = f"{amount.normalize():f}"
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


def _ceil(t) -> int:
    i = int(t)
    return i if i == t else i + 1


def _summary(kind: str, case: CheckInput, duration, cents: int, claims: list[Claim], by_id: dict,
             extra_events: int) -> str:
    """One plain sentence per finding: what was billed wrongly, how much time, what it is worth."""
    h = _hours(duration)
    money = fmt_money(cents)
    thr = case.throttle
    if kind == "duplicate_charge":
        parts = []
        for what, where in (("exact duplicate", "in exact duplicate records"),
                            ("partial overlap", "in records overlapping earlier ones")):
            d = sum((c.piece.duration for c in claims if _dup_kind(c, by_id) == what), 0)
            if d:
                parts.append(f"{_hours(d)} h {where}")
        if extra_events:
            parts.append(f"{_n(extra_events, 'extra metering event')} in Polar")
        return f"{h} h billed more than once ({'; '.join(parts)}): {money}"
    if kind == "stuck_instance":
        return f"{h} h billed after the instance had stopped, been paused or gone idle: {money}"
    if kind == "throttle_continuous":
        return (f"{h} h billed after the instance ran past the org's {fmt_duration(thr.continuous_limit)} "
                f"continuous limit without being paused: {money}")
    if kind == "throttle_daily":
        return (f"{h} h billed after org {case.instance.org_id} used up its {fmt_duration(thr.daily_limit)} "
                f"daily limit, when the instance should have been paused: {money}")
    billed = sorted({(c.piece.record.tier, c.piece.record.rate_per_hour) for c in claims})
    billed_text = ", ".join(f"{t} ({_rate(r)})" for t, r in billed)
    return f"{h} h charged as {billed_text} although the instance is {_true_tier_rate(case)}: {money} overcharged"


def _true_tier_rate(case: CheckInput) -> str:
    tier, _ = wrong_tier.true_tier(case.instance, case.pods, case.log_events)
    rate = case.rate_card.get(tier)
    return f"{tier} ({_rate(rate)})" if rate is not None else tier


def _systematic(case: CheckInput, findings: Iterable[Finding]) -> list[str]:
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
