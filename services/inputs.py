"""Checks of what people type (instance ids, billing periods, days), kept apart from the
investigation so the CLI's light commands (reconcile, report) start without loading the
Kubernetes and Polar clients."""
from __future__ import annotations

import re
from datetime import date

INSTANCE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
PERIOD = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")


class InputError(ValueError):
    """Bad input from a person: a clear, specific message; nothing was read or changed."""


class UnknownInstance(InputError):
    pass


def validate_instance_id(value: str) -> str:
    value = (value or "").strip()
    if not INSTANCE_ID.fullmatch(value):
        raise InputError(
            f"invalid instance id {value!r}: expected 2-63 characters of lowercase letters, digits and '-', "
            "starting with a letter or digit (like i-7f3a)")
    return value


def validate_period(value: str) -> str:
    if not PERIOD.fullmatch((value or "").strip()):
        raise InputError(f"malformed period {value!r}: expected YYYY-MM, like 2026-10")
    return value.strip()


def validate_day(value: str) -> date:
    """A UTC day as YYYY-MM-DD (reconcile --date, report --since)."""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value or ""):
        raise InputError(f"malformed date {value!r}: expected YYYY-MM-DD, like 2026-10-05")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InputError(f"malformed date {value!r}: no such day") from None
