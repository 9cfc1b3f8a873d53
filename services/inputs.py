"""Checks of what people type (instance ids, billing periods, days), kept apart from the
investigation so the CLI's light commands (reconcile, report) start without loading the
Kubernetes and Polar clients."""
from __future__ import annotations

import re
from datetime import date

INSTANCE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
PERIOD = re.compile(r"^([0-9]{4})-(0[1-9]|1[0-2])$")  # ASCII digits only: \d takes any script's
TICKET = re.compile(r"^[A-Za-z0-9#._-]{1,64}$")


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


def validate_ticket(value: str | None) -> str | None:
    """A support ticket id as the helpdesk writes it (T-1234, #5678, ZD.42)."""
    value = (value or "").strip()
    if not value:
        return None
    if not TICKET.fullmatch(value):
        raise InputError("invalid ticket id: expected 1-64 letters, digits or '#._-' (like T-1234)")
    return value


def validate_day(value: str) -> date:
    """A UTC day as YYYY-MM-DD (reconcile --date, report --since)."""
    if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value or ""):
        raise InputError(f"malformed date {value!r}: expected YYYY-MM-DD, like 2026-10-05")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InputError(f"malformed date {value!r}: no such day") from None
