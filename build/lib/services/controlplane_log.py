"""Parse the control plane's log lines (SPEC 1.2). Lines the bot does not understand are skipped."""
from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Iterable

from handlers.model import LogEvent
from handlers.timeline import to_us

# Go's standard logger: "2026/10/03 14:02:11 message", optionally with microseconds (log.Lmicroseconds).
_LINE = re.compile(r"^(\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2})(\.\d{1,9})? (.*?)\s*$")
_ID = r"([a-z0-9][a-z0-9-]{1,62})"
_ORG = r"(\S+)"

_MESSAGES: list[tuple[str, re.Pattern]] = [
    ("creating", re.compile(rf"Creating instance {_ID} \(tier (\S+), org {_ORG}\)")),
    ("stopping", re.compile(rf"Stopping instance {_ID} \(requested by (.+)\)")),
    ("reaping", re.compile(rf"Reaping idle instance {_ID}")),
    ("pausing", re.compile(rf"Pausing instance {_ID} due to (\S+)")),
    ("resuming", re.compile(rf"Resuming instance {_ID}")),
    ("reap_failed", re.compile(rf"Failed to delete idle instance {_ID}: (.*)")),
    ("pause_failed", re.compile(rf"Failed to pause instance {_ID}: (.*)")),
    ("continuous_exceeded", re.compile(rf"Instance {_ID} exceeded continuous limit \((.*)\)")),
    ("daily_exceeded", re.compile(rf"Org {_ORG} exceeded daily limit \((.*)\)")),
]


def parse_line(line: str, pod: str = "") -> LogEvent | None:
    m = _LINE.match(line)
    if not m:
        return None
    stamp, frac, message = m.groups()
    at = datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S").replace(tzinfo=timezone.utc)
    us = to_us(at) + (int((frac[1:] + "000000")[:6]) if frac else 0)
    for kind, pattern in _MESSAGES:
        mm = pattern.fullmatch(message)
        if not mm:
            continue
        g = mm.groups()
        if kind == "creating":
            return LogEvent(us, kind, g[0], g[2], g[1], line, pod)
        if kind == "daily_exceeded":
            return LogEvent(us, kind, None, g[0], g[1], line, pod)
        return LogEvent(us, kind, g[0], None, g[1] if len(g) > 1 else "", line, pod)
    return None


def parse_lines(lines: Iterable[str], pod: str = "") -> list[LogEvent]:
    out = []
    for line in lines:
        ev = parse_line(line, pod)
        if ev is not None:
            out.append(ev)
    return out
