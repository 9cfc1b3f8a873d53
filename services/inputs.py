"""Checks of what people type (instance ids, billing periods, days), kept apart from the
investigation so the CLI's light commands (reconcile, report) start without loading the
Kubernetes and Polar clients."""
from __future__ import annotations

import re
from datetime import date

from handlers.model import KINDS as FINDING_KINDS

INSTANCE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
PERIOD = re.compile(r"^([0-9]{4})-(0[1-9]|1[0-2])$")  # ASCII digits only: \d takes any script's
TICKET = re.compile(r"^[A-Za-z0-9#._-]{1,64}$")
# A customer id is the customer's external_id in Polar and an org id the control plane's: neither
# has a published format, so this admits what ids are made of and refuses spaces, quotes, Slack
# markup and control characters (an id is echoed back in messages and lands in CSV files).
EXTERNAL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$")


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


def _validate_external(value: str, what: str, example: str) -> str:
    value = (value or "").strip()
    if not EXTERNAL_ID.fullmatch(value):
        raise InputError(
            f"invalid {what} id {value[:80]!r}: expected 1-128 letters, digits or '._:@+-', starting with a letter "
            f"or digit (like {example})")
    return value


def validate_customer_id(value: str) -> str:
    return _validate_external(value, "customer", "c-acme")


def validate_org_id(value: str) -> str:
    return _validate_external(value, "org", "o-acme")


def validate_kind(value: str) -> str:
    """A finding kind of SPEC 2.2 (remediate --kind)."""
    value = (value or "").strip()
    if value not in FINDING_KINDS:
        raise InputError(f"unknown finding kind {value[:80]!r}: expected one of {', '.join(FINDING_KINDS)}")
    return value


def validate_month(value: str) -> str:
    """A month YYYY-MM (report --usage --month)."""
    if not PERIOD.fullmatch((value or "").strip()):
        raise InputError(f"malformed month {value!r}: expected YYYY-MM, like 2026-10")
    return value.strip()


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
