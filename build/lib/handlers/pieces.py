"""Cutting pieces of billed time against windows: the one interval operation every step uses."""
from __future__ import annotations

from bisect import bisect_right
from typing import Hashable, Sequence, TypeVar

from .model import Piece
from .timeline import DAY_US, Time

Tag = TypeVar("Tag", bound=Hashable)


def merge_windows(windows: Sequence[tuple[Time, Time, Tag]]) -> list[tuple[Time, Time, Tag]]:
    """Union of windows as sorted disjoint windows; a merged window keeps its earliest tag."""
    if len(windows) == 1:
        w = windows[0]
        return [tuple(w)] if w[1] > w[0] else []
    out: list[list] = []
    for start, end, tag in sorted(windows, key=lambda w: (w[0], w[1])):
        if end <= start:
            continue
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end, tag])
    return [tuple(w) for w in out]  # type: ignore[misc]


def cut(pieces: Sequence[Piece], windows: Sequence[tuple[Time, Time, Tag]]) -> tuple[list[Piece], list[tuple[Piece, Tag]]]:
    """Split pieces into the parts outside the windows and the parts inside (with the window's tag).

    windows must be sorted and disjoint (merge_windows gives that).
    """
    if not windows:
        return list(pieces), []
    ends = [w[1] for w in windows]
    outside: list[Piece] = []
    inside: list[tuple[Piece, Tag]] = []
    for p in pieces:
        cursor = p.start
        i = bisect_right(ends, p.start)  # first window ending after the piece starts
        while i < len(windows) and windows[i][0] < p.end:
            ws, we, tag = windows[i]
            if ws > cursor:
                outside.append(Piece(p.record, cursor, ws))
            lo, hi = max(ws, cursor), min(we, p.end)
            if hi > lo:
                inside.append((Piece(p.record, lo, hi), tag))
            cursor = max(cursor, hi)
            i += 1
        if cursor < p.end:
            outside.append(p if cursor == p.start else Piece(p.record, cursor, p.end))
    return outside, inside


def split_at_midnights(pieces: Sequence[Piece]) -> list[Piece]:
    """Cut pieces at UTC midnight so each lies within one day (SPEC 2.2 step 4)."""
    out: list[Piece] = []
    for p in pieces:
        start = p.start
        boundary = (int(start) // DAY_US + 1) * DAY_US
        if boundary >= p.end:
            out.append(p)
            continue
        while boundary < p.end:
            out.append(Piece(p.record, start, boundary))
            start = boundary
            boundary += DAY_US
        out.append(Piece(p.record, start, p.end))
    return out
