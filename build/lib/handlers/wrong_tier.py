"""Step 5, wrong_tier: pieces charged above what the instance's true tier costs."""
from __future__ import annotations

from decimal import Decimal
from typing import Sequence

from .model import Instance, LogEvent, Piece, Pod
from .timeline import cost, sub


def true_tier(instance: Instance, pods: Sequence[Pod], events: Sequence[LogEvent]) -> tuple[str, str]:
    """The pod's tier label, else the Creating line's tier, else instances.tier; with its source."""
    for pod in pods:
        if pod.tier:
            return pod.tier, f"pod {pod.name} label tier={pod.tier}"
    creating = [e for e in events if e.kind == "creating" and e.instance_id == instance.instance_id]
    if creating:
        first = min(creating, key=lambda e: e.at)
        return first.detail, f"control plane: Creating instance {instance.instance_id} (tier {first.detail})"
    return instance.tier, f"instances.tier = {instance.tier}"


def price_pieces(pieces: Sequence[Piece], rate: Decimal) -> tuple[list[tuple[Piece, Decimal]], Decimal]:
    """Overcharged pieces with their overcharge, and the total undercharge (never credited)."""
    over: list[tuple[Piece, Decimal]] = []
    under = Decimal(0)
    for p in pieces:
        diff = sub(p.charge, cost(p.duration, rate))
        if diff > 0:
            over.append((p, diff))
        elif diff < 0:
            under -= diff
    return over, under
