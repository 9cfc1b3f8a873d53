"""The customer email (runbook wording), one variant per method, sent by SMTP when SMTP_URL is set.

The letter states the amount actually credited (`issued_cents`: after an Adjust, or a refund capped
by the order's refundable amount, never the proposed figure), explains each finding in the
customer's words, and names where the credit appears: for a refund, the invoice of each month
refunded; for invoice credit, the next invoice.

SMTP_URL: smtp://[user:password@]host[:port][?starttls=1&from=support@orzbob.cloud] or smtps://...
"""
from __future__ import annotations

import asyncio
import smtplib
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from email.message import EmailMessage
from urllib.parse import parse_qs, unquote, urlsplit

from handlers.timeline import allocate, fmt_money
from templates import render

DEFAULT_FROM = "Orzbob Cloud Support <support@orzbob.cloud>"


@dataclass
class Letter:
    to: str | None
    subject: str
    body: str


def compose(case: dict, customer: dict | None, refs: list[str]) -> Letter:
    report = case["report"]
    issued = case.get("issued_cents")
    if issued is None:  # not issued yet (a draft): the approved amount, which is what will move
        issued = case["credit_cents"]
    findings = report["findings"]
    # Per-finding amounts only when they add up to what was credited; after an Adjust or a capped
    # refund they would contradict the amount the letter states.
    show_amounts = sum(f["credit_cents"] for f in findings) == issued
    periods = _credited_periods(case)
    template = "email_refund.txt.j2" if case["method"] == "refund" else "email_invoice_credit.txt.j2"
    # a customer Polar did not know is still greeted (the draft goes to the agent)
    who = {"name": (customer or {}).get("name"), "email": (customer or {}).get("email")}
    text = render(template, case=case, report=report, customer=who, refs=refs, issued_cents=issued,
                  findings=[customer_words(f, report, show_amounts) for f in findings],
                  usage_months=_and([month_name(p) for p in periods]),
                  refunded_where=_refunded_where(case, periods, issued))
    subject, _, body = text.partition("\n\n")
    return Letter((customer or {}).get("email"), subject.removeprefix("Subject: ").strip(), body)


def customer_words(finding: dict, report: dict, show_amount: bool) -> str:
    """One finding as the customer would say it: no kind names, no rules, no internal figures."""
    h = _hours(finding["hours"])
    tier = report.get("true_tier")
    text = {
        "duplicate_charge": f"{h} of usage were billed more than once.",
        "stuck_instance": f"{h} were billed after your instance had stopped, been paused or gone idle, "
                          "when billing should have ended.",
        "throttle_continuous": f"{h} were billed after your instance passed your organization's limit for "
                               "continuous running, when it should have been paused.",
        "throttle_daily": f"{h} were billed after your organization reached its daily usage limit, when the "
                          "instance should have been paused.",
        "wrong_tier": (f"{h} were charged at a higher-priced tier than the {tier} tier your instance runs on."
                       if tier else f"{h} were charged at a higher-priced tier than your instance's own."),
    }.get(finding["kind"], f"{h} were billed incorrectly.")
    if h == "1 hour":  # "1 hour were billed" -> "was"
        text = text.replace(" were ", " was ", 1)
    return f"{text[:-1]}: {fmt_money(finding['credit_cents'])}." if show_amount else text


def month_name(period: str) -> str:
    """'2026-10' -> 'October 2026'."""
    return date(int(period[:4]), int(period[5:7]), 1).strftime("%B %Y")


def _hours(text: str) -> str:
    value = Decimal(text)
    shown = format(value.normalize(), "f")
    return f"{shown} hour" if value == 1 else f"{shown} hours"


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _split(case: dict) -> dict[str, int]:
    """The credit per billing period, as issuing splits it over the orders (services/issuing.py
    Issuer._split): the case's amount in proportion to each period's share of the findings."""
    by_period = {p: Decimal(c) for p, c in (case["report"].get("credit_by_period") or {}).items()}
    if not by_period:
        by_period = {max(case["periods"]): Decimal(1)}
    return allocate(case["credit_cents"], by_period)


def _credited_periods(case: dict) -> list[str]:
    return sorted(_split(case)) or sorted(case["periods"])


def _refunded_where(case: dict, periods: list[str], issued: int) -> str:
    """What was refunded on which invoice: the invoice of each month refunded (the order that
    invoiced that month, SPEC 4), with the amount per invoice when the whole split was refunded."""
    split = _split(case)
    if len(periods) == 1:
        return f"{fmt_money(issued)} of the charges on your invoice for {month_name(periods[0])} usage"
    if not case.get("remainder_cents") and sum(split.values()) == issued:
        return _and([f"{fmt_money(split[p])} on your invoice for {month_name(p)} usage" for p in periods])
    return f"{fmt_money(issued)} of the charges on your invoices for {_and([month_name(p) + ' usage' for p in periods])}"


def send_smtp(url: str, letter: Letter) -> None:
    u = urlsplit(url)
    q = parse_qs(u.query)
    sender = q.get("from", [DEFAULT_FROM])[0]
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, letter.to, letter.subject
    msg.set_content(letter.body)
    port = u.port or (465 if u.scheme == "smtps" else 25)
    cls = smtplib.SMTP_SSL if u.scheme == "smtps" else smtplib.SMTP
    with cls(u.hostname, port, timeout=15) as smtp:
        if q.get("starttls", ["0"])[0] == "1":
            smtp.starttls()
        if u.username:
            smtp.login(unquote(u.username), unquote(u.password or ""))
        smtp.send_message(msg)


async def deliver(url: str, letter: Letter) -> None:
    await asyncio.to_thread(send_smtp, url, letter)
