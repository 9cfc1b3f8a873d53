"""Steps 3 and 4: time billed past the continuous limit and past the org's daily limit."""
from __future__ import annotations

from collections import defaultdict
from fractions import Fraction
from typing import Iterable, Sequence

from .model import OrgInterval, Piece
from .pieces import merge_windows, split_at_midnights
from .timeline import DAY_US, US, Time, day_start

RUN_GAP_US = 60 * US  # a piece starting within 60 s of the previous one's end continues the run


def continuous_excess(pieces: Sequence[Piece], limit_us: int | None) -> tuple[list[Piece], list[tuple[Piece, int]]]:
    """Time after run start + continuous_limit; excess pieces come with their run's start."""
    if limit_us is None:
        return list(pieces), []
    remaining: list[Piece] = []
    excess: list[tuple[Piece, int]] = []
    run_start: Time | None = None
    prev_end: Time | None = None
    for p in sorted(pieces, key=lambda p: (p.start, p.end)):
        if run_start is None or p.start - prev_end > RUN_GAP_US:
            run_start = p.start
        prev_end = p.end if prev_end is None else max(prev_end, p.end)
        cutoff = run_start + limit_us
        if p.end <= cutoff:
            remaining.append(p)
        elif p.start >= cutoff:
            excess.append((p, run_start))
        else:
            remaining.append(Piece(p.record, p.start, cutoff))
            excess.append((Piece(p.record, cutoff, p.end), run_start))
    return remaining, excess


def instance_unions_by_day(intervals: Iterable[OrgInterval]) -> dict[int, dict[str, list[tuple[int, int]]]]:
    """Day start -> instance -> that instance's billed time that day, each second once (step 1)."""
    raw: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for iv in intervals:
        start = iv.start
        while start < iv.end:
            day = day_start(start)
            end = min(iv.end, day + DAY_US)
            raw[day][iv.instance_id].append((start, end, None))
            start = end
    return {day: {inst: [(s, e) for s, e, _ in merge_windows(ws)] for inst, ws in per.items()}
            for day, per in raw.items()}


def limit_reached_at(unions: dict[str, list[tuple[int, int]]], day: int, limit_us: int) -> Time | None:
    """The moment T the org's billed time that day reaches the limit, or None if it never does.

    Billed time accrues at the rate of the number of instances billing at once, so T can fall
    between two microseconds: it is then an exact Fraction.
    """
    if limit_us <= 0:
        return day
    changes: dict[int, int] = defaultdict(int)
    for spans in unions.values():
        for s, e in spans:
            changes[s] += 1
            changes[e] -= 1
    accrued = 0
    running = 0
    prev = day
    for t in sorted(changes):
        if running:
            reach = accrued + running * (t - prev)
            if reach >= limit_us:
                at = prev + Fraction(limit_us - accrued, running)
                return int(at) if at.denominator == 1 else at
            accrued = reach
        running += changes[t]
        prev = t
    return None


def daily_excess(pieces: Sequence[Piece], org_intervals: Sequence[OrgInterval] | None,
                 limit_us: int | None) -> tuple[list[Piece], list[tuple[Piece, Time]]]:
    """The instance's remaining time after T on each day, each excess piece with its day's T."""
    if limit_us is None or org_intervals is None:
        return list(pieces), []
    unions = instance_unions_by_day(org_intervals)
    remaining: list[Piece] = []
    excess: list[tuple[Piece, Time]] = []
    cache: dict[int, Time | None] = {}
    for p in split_at_midnights(pieces):
        day = day_start(p.start)
        if day not in cache:
            cache[day] = limit_reached_at(unions[day], day, limit_us) if day in unions else None
        t = cache[day]
        if t is None or p.end <= t:
            remaining.append(p)
        elif p.start >= t:
            excess.append((p, t))
        else:
            remaining.append(Piece(p.record, p.start, t))
            excess.append((Piece(p.record, t, p.end), t))
    return remaining, excess
