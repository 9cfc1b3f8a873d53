"""Block Kit payloads: rendered from the Jinja2 templates, then held to Block Kit's limits."""
from __future__ import annotations

import json

from handlers.coverage import coverage_line, kind_title
from handlers.pipeline import id_ranges
from handlers.timeline import fmt_money
from templates import render

MAX_BLOCKS = 50
MAX_TEXT = 3000
MAX_FINDINGS_IN_MESSAGE = 5


def cut_text(text: str, limit: int = MAX_TEXT) -> str:
    if len(text) <= limit:
        return text
    return text[: limit - 1] + "…"


def enforce_limits(payload: dict) -> dict:
    """Cut every text to 3,000 characters and the message to 50 blocks, keeping the last block (the
    buttons or the status) so a long case never loses its actions."""
    blocks = payload.get("blocks", [])
    for b in blocks:
        if "text" in b and isinstance(b["text"], dict):
            b["text"]["text"] = cut_text(b["text"]["text"])
        for f in b.get("fields", []):
            f["text"] = cut_text(f["text"], 2000)
        for e in b.get("elements", []):
            if e.get("type") == "mrkdwn":
                e["text"] = cut_text(e["text"])
    if len(blocks) > MAX_BLOCKS:
        dropped = len(blocks) - MAX_BLOCKS + 1
        note = {"type": "context", "elements": [{"type": "mrkdwn", "text": f"…and {dropped} more blocks in the thread"}]}
        blocks = blocks[: MAX_BLOCKS - 2] + [note, blocks[-1]]
    payload["blocks"] = blocks
    if "text" in payload:
        payload["text"] = cut_text(payload["text"], 4000)
    return payload


def level_text(config, level: int) -> str:
    return "no approval (nothing to credit)" if level == 0 else f"level {config.level_label(level)}"


def status_line(case: dict) -> str:
    state = case["state"]
    who = f"<@{case['decided_by']}>" if case.get("decided_by") else "someone"
    if state == "approved":
        return f":white_check_mark: Approved by {who} for {fmt_money(case['credit_cents'])}: issuing in Polar…"
    if state == "issuing":
        return f":hourglass: Approved by {who}: issuing {fmt_money(case['credit_cents'])} in Polar…"
    if state == "issued":
        ref = case.get("polar_reference") or ""
        return (f":white_check_mark: Approved by {who}; {fmt_money(case.get('issued_cents') or case['credit_cents'])} "
                f"issued in Polar{(' (' + ref + ')') if ref else ''}")
    if state == "rejected":
        return f":no_entry: Rejected by {who}: {case.get('reason') or 'no reason given'}"
    if state == "failed":
        return f":warning: Issuing failed: {case.get('reason') or 'see the thread'}. A lead can retry."
    if state == "expired":
        return "Nothing to credit: this case needs no decision."
    return state


def case_message(case: dict, config, customer_name: str | None = None) -> dict:
    report = case["report"]
    findings = report["findings"]
    shown = findings[:MAX_FINDINGS_IN_MESSAGE]
    text = render("case_message.json.j2", case=case, findings=shown, more_findings=len(findings) - len(shown),
                  customer_name=customer_name, level_text=level_text(config, case["required_level"]),
                  status_line=status_line(case))
    return enforce_limits(json.loads(text))


def evidence_messages(report: dict, limit: int = MAX_TEXT) -> list[str]:
    """The full evidence for the thread, split into messages under Slack's text limit. It opens with
    the coverage, so the thread never reads as an all-clear the check could not give."""
    cov = report.get("coverage")
    out: list[str] = []
    current = ""
    lines = [coverage_line(cov)]
    if cov and cov.get("state") == "partial":
        lines += [f"• {w}" for w in cov.get("why", [])]
    for f in report["findings"]:
        hours = f["hours"].rstrip("0").rstrip(".")
        lines.append(f"*{kind_title(f['kind'])}* {fmt_money(f['credit_cents'])} ({hours} h; "
                     f"{id_ranges(f['record_ids'])})")
        lines.append(f["summary"])
        lines += [f"• {e}" for e in f["evidence"]]
    lines += [f"_Note: {n}_" for n in report.get("notes", [])]
    lines += [f":rotating_light: systematic: {why}" for why in report.get("systematic_reasons", [])]
    for line in lines:
        line = cut_text(line, limit - 10)
        if len(current) + len(line) + 1 > limit:
            out.append(current)
            current = ""
        current += line + "\n"
    if current:
        out.append(current)
    return out
