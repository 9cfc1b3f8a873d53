"""The customer email (runbook wording), one variant per method, sent by SMTP when SMTP_URL is set.

SMTP_URL: smtp://[user:password@]host[:port][?starttls=1&from=support@orzbob.cloud] or smtps://...
"""
from __future__ import annotations

import asyncio
import smtplib
from dataclasses import dataclass
from email.message import EmailMessage
from urllib.parse import parse_qs, unquote, urlsplit

from templates import render

DEFAULT_FROM = "Orzbob Cloud Support <support@orzbob.cloud>"


@dataclass
class Letter:
    to: str | None
    subject: str
    body: str


def compose(case: dict, customer: dict | None, refs: list[str]) -> Letter:
    report = case["report"]
    template = "email_refund.txt.j2" if case["method"] == "refund" else "email_invoice_credit.txt.j2"
    text = render(template, case=case, report=report, customer=customer or {}, refs=refs)
    subject, _, body = text.partition("\n\n")
    return Letter((customer or {}).get("email"), subject.removeprefix("Subject: ").strip(), body)


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
