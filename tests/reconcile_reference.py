"""A slow, obviously correct reconciliation (SPEC 5.2) in plain Python, the oracle the set-based SQL
is checked against. Exact arithmetic throughout: times are integer microseconds, money Fractions.

It reads the rules the way the SPEC states them, with none of the statement's shortcuts: runs are
found over the instance's whole history, step 1's own pieces by subtracting every lower-id record,
and the daily limit by walking the org's events one by one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

US = 1_000_000
GAP = 60 * US  # a run goes on across a gap of at most 60 s


@dataclass(frozen=True)
class Rec:
    id: int
    instance: str
    org: str
    customer: str
    tier: str
    rate: Decimal
    hours: Decimal
    charge: Decimal
    s: int  # microseconds since the epoch
    e: int


@dataclass(frozen=True)
class Inst:
    id: str
    customer: str
    status: str
    stopped_at: int | None
    heartbeat: int | None


def cents(x: Fraction) -> int:
    """Half-up to cents, as services.reconcile does; nothing for a non-positive amount."""
    return math.floor(x * 100 + Fraction(1, 2)) if x > 0 else 0


def _subtract(span: tuple[int, int], cuts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = [span]
    for cs, ce in cuts:
        nxt = []
        for s, e in out:
            if ce <= s or cs >= e:
                nxt.append((s, e))
                continue
            if s < cs:
                nxt.append((s, cs))
            if ce < e:
                nxt.append((ce, e))
        out = nxt
    return out


def _union_length(spans: list[tuple[int, int]]) -> int:
    total, end = 0, None
    for s, e in sorted(spans):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def reconcile(records: list[Rec], instances: dict[str, Inst], throttles: dict[str, tuple], usage: dict,
              lo: int, hi: int, card: dict[str, Decimal], defaults: tuple, tolerance: Decimal) -> dict:
    """{(kind, instance or org): (customer, sorted record ids, overcharge cents)}.

    throttles: org -> (continuous, daily, idle) in microseconds or None; defaults likewise;
    usage: (instance, org) -> hours (Decimal) for the day."""
    recs = [r for r in records if r.e > r.s]
    day = [r for r in recs if r.s < hi and r.e > lo]
    limits = {r.org: throttles.get(r.org, defaults) for r in recs}

    def inday(r):
        return max(r.s, lo), min(r.e, hi)

    def amount(r, a, b):
        return Fraction(r.charge) * (b - a) / (r.e - r.s)

    out: dict = {}
    groups: dict = {}

    def add(kind, key, customer, ids, money):
        c, i, m = groups.get((kind, key), (customer, set(), Fraction(0)))
        groups[(kind, key)] = (min(c, customer), i | set(ids), m + money)

    for r in day:
        a, b = inday(r)
        on_card = card.get(r.tier)
        if on_card is None or r.rate != on_card:
            price = on_card if on_card is not None else r.rate
            add("rate_mismatch", r.instance, r.customer, [r.id],
                max(amount(r, a, b) - Fraction(price) * (b - a) / (3600 * US), Fraction(0)))
        if (abs(Fraction(r.hours) - Fraction(r.e - r.s, 3600 * US)) > Fraction(5, 100000)
                or abs(r.charge - r.rate * r.hours) > Decimal("0.005")):
            add("charge_mismatch", r.instance, r.customer, [r.id], Fraction(0))
        inst = instances.get(r.instance)
        if inst and inst.status != "running" and inst.stopped_at is not None and inst.stopped_at < hi \
                and r.e > inst.stopped_at:
            add("billed_after_stop", r.instance, r.customer, [r.id], amount(r, max(a, inst.stopped_at), b))
        idle = limits[r.org][2]
        if inst and idle is not None and inst.heartbeat is not None and inst.heartbeat + idle < hi \
                and r.e > inst.heartbeat + idle:
            add("billed_while_idle", r.instance, r.customer, [r.id], amount(r, max(a, inst.heartbeat + idle), b))

    copies: dict = {}
    for r in day:
        copies.setdefault((r.instance, r.org, r.s, r.e), []).append(r)
    for (iid, _org, _s, _e), rs in copies.items():
        if len(rs) > 1:
            rs = sorted(rs, key=lambda x: x.id)
            add("duplicate", iid, min(x.customer for x in rs), [x.id for x in rs],
                sum((amount(x, *inday(x)) for x in rs[1:]), Fraction(0)))

    for r in day:
        a, b = inday(r)
        earlier = [q for q in day if q.instance == r.instance and q.id < r.id and not (q.s == r.s and q.e == r.e)
                   and q.s < b and q.e > a]
        if earlier:
            covered = _union_length([(max(a, q.s), min(b, q.e)) for q in earlier])
            add("overlap", r.instance, r.customer, [r.id] + [q.id for q in earlier], amount(r, 0, covered))

    billed: dict = {}
    for r in day:
        a, b = inday(r)
        c, ids, h = billed.get((r.instance, r.org), (r.customer, set(), Fraction(0)))
        billed[(r.instance, r.org)] = (min(c, r.customer), ids | {r.id}, h + Fraction(b - a, 3600 * US))
    for key in set(billed) | set(usage):
        c, ids, h = billed.get(key, (instances[key[0]].customer if key[0] in instances else None, set(), Fraction(0)))
        if abs(h - Fraction(usage.get(key, Decimal(0)))) > Fraction(tolerance):
            groups[("usage_mismatch", key[0])] = (c, ids, Fraction(0))

    # step 1: each in-day record's own pieces, the part no lower-id record of its instance billed
    pieces = []
    for r in day:
        cuts = [(q.s, q.e) for q in recs if q.instance == r.instance and q.id < r.id]
        pieces += [(r, s, e) for s, e in _subtract(inday(r), cuts)]

    # continuous limit: runs over the instance's whole history
    for r, s, e in pieces:
        cont = limits[r.org][0]
        if cont is None:
            continue
        spans = sorted((q.s, q.e) for q in recs if q.instance == r.instance)
        start, end = spans[0]
        for qs, qe in spans[1:]:
            if qs > s:
                break
            if qs - end > GAP:
                start = qs
            end = max(end, qe)
        cutoff = start + cont
        if e > cutoff:
            add("continuous_limit", r.instance, r.customer, [r.id], amount(r, max(s, cutoff), e))

    # daily limit: the moment T the org's billed time reaches the limit, then everything after it
    for org in sorted({r.org for r in day}):
        limit = limits[org][1]
        own = [(r, s, e) for r, s, e in pieces if r.org == org]
        if limit is None or not own:
            continue
        events = sorted([(s, 1) for _, s, _ in own] + [(e, -1) for _, _, e in own])
        billed_so_far, open_now, t_prev, when = Fraction(0), 0, events[0][0], None
        for t, d in events:
            step = open_now * (t - t_prev)
            if open_now and billed_so_far + step > limit:
                when = t_prev + (limit - billed_so_far) / Fraction(open_now)
                break
            billed_so_far += step
            open_now += d
            t_prev = t
        if when is None:
            continue
        for r, s, e in own:
            if e > when:
                add("daily_limit", org, r.customer, [r.id], amount(r, max(Fraction(s), when), e))

    for (kind, key), (c, ids, money) in groups.items():
        out[(kind, key)] = (c, sorted(ids), cents(money))
    return out
