"""Step 1, duplicate_charge: time billed twice, in the database or in Polar (SPEC 2.2 step 1)."""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Sequence

from .model import Piece, Record, UsageEvent


def split_duplicates(records: Sequence[Record]) -> tuple[list[Piece], list[tuple[Piece, int]]]:
    """Walk the records in id order; time already covered by a lower id is duplicate.

    Returns the first-billed pieces and the duplicate pieces, each with the id of the record
    that billed that time first. `covered` holds disjoint segments of billed time, each tagged
    with the record that billed it first; records mostly arrive in time order, so inserts land
    at the end and the walk is near-linear.
    """
    starts: list[int] = []
    segments: list[tuple[int, int, int]] = []
    first: list[Piece] = []
    duplicate: list[tuple[Piece, int]] = []
    for r in sorted(records, key=lambda r: r.id):
        if r.end <= r.start:
            continue
        a, b = r.start, r.end
        j = max(bisect_right(starts, a) - 1, 0)
        cursor = a
        gaps: list[tuple[int, int]] = []
        while j < len(segments) and segments[j][0] < b:
            s, e, rid = segments[j]
            j += 1
            if e <= a:
                continue
            if s > cursor:
                gaps.append((cursor, s))
            lo, hi = max(s, a), min(e, b)
            duplicate.append((Piece(r, lo, hi), rid))
            cursor = max(cursor, hi)
        if cursor < b:
            gaps.append((cursor, b))
        for s, e in gaps:
            first.append(Piece(r, s, e))
            k = bisect_left(starts, s)
            starts.insert(k, s)
            segments.insert(k, (s, e, r.id))
    return first, duplicate


@dataclass(frozen=True)
class ExtraEvents:
    record: Record  # the lowest-id record of the interval: the one billed again per extra event
    extra: int
    events: int
    records: int


def extra_polar_events(records: Sequence[Record], events: Sequence[UsageEvent]) -> list[ExtraEvents]:
    """Intervals with more metering events in Polar than records in the database.

    Each extra event billed the interval's lowest-id record once more (SPEC 2.2 step 1).
    An interval with events but no record at all is left to a human: there is no record to
    price it by, so it is not credited here.
    """
    by_interval: dict[tuple[int, int], list[Record]] = defaultdict(list)
    for r in records:
        by_interval[(r.start, r.end)].append(r)
    counts = Counter((e.start, e.end) for e in events)
    out = []
    for key, n_events in sorted(counts.items()):
        recs = by_interval.get(key)
        if recs and n_events > len(recs):
            lowest = min(recs, key=lambda r: r.id)
            out.append(ExtraEvents(lowest, n_events - len(recs), n_events, len(recs)))
    return out
