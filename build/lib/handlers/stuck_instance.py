"""Step 2, stuck_instance: billed time inside a window where billing must have stopped."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence

from .model import Instance, LogEvent, Pod
from .timeline import FOREVER, fmt_time, td_us

STOP_KINDS = {"stopping", "reaping", "pausing"}


@dataclass(frozen=True)
class Window:
    start: int
    end: int  # FOREVER when it never closed
    reason: str  # evidence an agent could paste into a ticket

    def as_tuple(self) -> tuple[int, int, str]:
        return (self.start, self.end, self.reason)


def log_windows(instance_id: str, events: Sequence[LogEvent]) -> list[Window]:
    """From each Stopping/Reaping/Pausing line until the next Resuming line, or forever."""
    windows: list[Window] = []
    open_at: int | None = None
    reason = ""
    for ev in sorted((e for e in events if e.instance_id == instance_id), key=lambda e: e.at):
        if ev.kind in STOP_KINDS and open_at is None:
            open_at, reason = ev.at, _stop_reason(ev)
        elif ev.kind == "resuming" and open_at is not None:
            windows.append(Window(open_at, ev.at, f"{reason}; resumed {fmt_time(ev.at)}"))
            open_at = None
    if open_at is not None:
        windows.append(Window(open_at, FOREVER, f"{reason}; never resumed"))
    return windows


def _stop_reason(ev: LogEvent) -> str:
    what = {
        "stopping": f"stop requested by {ev.detail}",
        "reaping": "idle reaper stopped it",
        "pausing": f"throttle paused it ({ev.detail})",
    }[ev.kind]
    return f"control plane: {what} at {fmt_time(ev.at)}"


def pod_windows(pods: Sequence[Pod]) -> list[Window]:
    out = []
    for pod in pods:
        marks = []
        if pod.terminated_at is not None:
            marks.append((pod.terminated_at, f"pod {pod.name} terminated {fmt_time(pod.terminated_at)}"))
        if pod.deleted_at is not None:
            marks.append((pod.deleted_at, f"pod {pod.name} deleted {fmt_time(pod.deleted_at)}"))
        if marks:
            at, why = min(marks)
            out.append(Window(at, FOREVER, why))
    return out


def instance_windows(instance: Instance, idle_timeout: timedelta | None) -> list[Window]:
    out = []
    if instance.status != "running" and instance.stopped_at is not None:
        out.append(Window(instance.stopped_at, FOREVER,
                          f"instance {instance.status} since {fmt_time(instance.stopped_at)} (stopped_at)"))
    if idle_timeout is not None and instance.last_heartbeat is not None:
        idle_from = instance.last_heartbeat + td_us(idle_timeout)
        out.append(Window(idle_from, FOREVER,
                          f"last heartbeat {fmt_time(instance.last_heartbeat)}; idle from {fmt_time(idle_from)} "
                          f"(idle timeout {_minutes(idle_timeout)})"))
    return out


def stuck_windows(instance: Instance, pods: Sequence[Pod], events: Sequence[LogEvent],
                  idle_timeout: timedelta | None) -> list[Window]:
    """Every non-billable window of SPEC 2.2 step 2, whenever it opened."""
    return (log_windows(instance.instance_id, events) + pod_windows(pods)
            + instance_windows(instance, idle_timeout))


def _minutes(value: timedelta) -> str:
    mins = int(value.total_seconds() // 60)
    return f"{mins} min" if mins < 120 or mins % 60 else f"{mins // 60} h"
