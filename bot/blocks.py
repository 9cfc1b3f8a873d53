"""Every Block Kit payload the bot sends, and Slack's mention syntax: small pure functions (the case
message is still laid out by its template), held to Block Kit's limits. User text is escaped."""
from __future__ import annotations

import json

from handlers.cases import Case, other_method
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


def escape(text) -> str:
    """Slack's mrkdwn control characters, so typed text cannot ping @channel or forge a link."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def mention_text(h: dict) -> str:
    parts = [f"<!subteam^{g}>" for g in h["groups"]] + [f"<@{u}>" for u in h["users"]]
    return ", ".join(parts) if parts else f"nobody is configured for level {h['level']} ({h['name']})"


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
        return f":no_entry: Rejected by {who}: {escape(case.get('reason') or 'no reason given')}"
    if state == "failed":
        return f":warning: Issuing failed: {escape(case.get('reason') or 'see the thread')}. An approver can retry."
    if state == "expired":
        return "Nothing to credit: this case needs no decision."
    return state


def case_message(case, config, customer_name: str | None = None) -> dict:
    view = _view(case)
    report = view["report"]
    findings = report["findings"]
    shown = findings[:MAX_FINDINGS_IN_MESSAGE]
    text = render("case_message.json.j2", case=view, findings=shown, more_findings=len(findings) - len(shown),
                  customer_name=customer_name, level_text=level_text(config, case["required_level"]),
                  status_line=status_line(view))
    msg = enforce_limits(json.loads(text))
    if view.get("exposure_cents"):
        note = (f"Needs level {config.level_label(view['required_level'])} for "
                f"{fmt_money(view['credit_cents'] + view['exposure_cents'])}: this credit plus "
                f"{fmt_money(view['exposure_cents'])} credited to or awaiting {escape(view['customer_id'])} "
                f"in the last {config.exposure_window.days} days.")
        msg["blocks"].insert(-1, {"type": "context", "elements": [{"type": "mrkdwn", "text": note}]})
    return msg


def _view(case) -> dict:
    """The case as the template reads it, with every piece of typed text escaped."""
    view = {k: case.get(k) for k in ("id", "state", "method", "report", "credit_cents", "proposed_cents",
                                     "required_level", "systematic", "ticket_id", "requested_by", "decided_by",
                                     "reason", "issued_cents", "polar_reference", "customer_id")}
    view["exposure_cents"] = case.get("exposure_cents") or 0
    if view["ticket_id"]:
        view["ticket_id"] = escape(view["ticket_id"])
    return view


def evidence_messages(report: dict, limit: int = MAX_TEXT) -> list[str]:
    """The full evidence for the thread, split into messages under Slack's text limit."""
    out: list[str] = []
    current = ""
    for f in report["findings"]:
        lines = [f"*{f['kind']}* {fmt_money(f['credit_cents'])} ({f['hours']} h; records "
                 f"{', '.join(map(str, f['record_ids'][:40]))}{' …' if len(f['record_ids']) > 40 else ''})"]
        lines += [f"• {e}" for e in f["evidence"]]
        for line in lines:
            line = cut_text(line, limit - 10)
            if len(current) + len(line) + 1 > limit:
                out.append(current)
                current = ""
            current += line + "\n"
    for n in report.get("notes", []):
        current += f"_Note: {n}_\n"
    for why in report.get("systematic_reasons", []):
        current += f":rotating_light: systematic: {why}\n"
    if current:
        out.append(current)
    return out


def _input(block_id: str, label: str, **element) -> dict:
    return {"type": "input", "block_id": block_id, "label": {"type": "plain_text", "text": label},
            "element": {"type": "plain_text_input", "action_id": "value", **element}}


def _modal(callback_id: str, title: str, submit: str, metadata: str, blocks: list[dict]) -> dict:
    return {"type": "modal", "callback_id": callback_id, "private_metadata": metadata,
            "title": {"type": "plain_text", "text": title[:24]}, "submit": {"type": "plain_text", "text": submit},
            "blocks": blocks}


def adjust_modal(case: Case) -> dict:
    return _modal("case_adjust_modal", f"Adjust case #{case.id}", "Lower the credit", str(case.id), [
        _input("amount", f"New credit (at most {fmt_money(case.credit_cents)})",
               initial_value=f"{case.credit_cents // 100}.{case.credit_cents % 100:02d}")])


def reject_modal(case: Case) -> dict:
    return _modal("case_reject_modal", f"Reject case #{case.id}", "Reject", str(case.id), [
        _input("reason", "Reason", multiline=True, min_length=3)])


def check_modal(channel_id: str | None) -> dict:
    def field(block_id, label, placeholder, optional):
        block = _input(block_id, label, placeholder={"type": "plain_text", "text": placeholder})
        block["optional"] = optional
        return block
    return _modal("billing_check_modal", "Billing check", "Investigate", channel_id or "", [
        field("instance", "Instance id", "i-7f3a", False),
        field("period", "Billing period (optional)", "YYYY-MM, default: this and last month", True),
        field("ticket", "Support ticket (optional)", "T-1234", True)])


def failure_message(case: Case, reason: str, offer_other_method: bool) -> dict:
    """The failure in the case's thread, with buttons bound to this failure: once the case has
    moved on, they answer that they are no longer current."""
    value = f"{case.id}:{case.failures}"
    buttons = [{"type": "button", "action_id": "case_retry", "value": value,
                "text": {"type": "plain_text", "text": f"Retry ({case.method.replace('_', ' ')})"}}]
    if offer_other_method:
        other = other_method(case.method)
        buttons.append({"type": "button", "action_id": f"case_{other}", "style": "primary", "value": value,
                        "text": {"type": "plain_text", "text": f"Issue the unpaid part as {other.replace('_', ' ')}"}})
    text = f":x: Issuing case #{case.id} failed: {escape(reason)}"
    return {"text": cut_text(text, 4000), "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": cut_text(text)}},
                                                     {"type": "actions", "elements": buttons}]}


def remainder_offer(case: Case, remainder_cents: int) -> dict:
    """What the order's refundable amount left unpaid, offered as invoice credit (SPEC 4)."""
    text = (f":warning: {fmt_money(remainder_cents)} could not be refunded (the order's refundable amount was "
            "reached). It stays on the case: a lead decides whether to credit it on the next invoice.")
    button = {"type": "button", "action_id": "case_remainder", "value": str(case.id),
              "text": {"type": "plain_text", "text": f"Credit the remaining {fmt_money(remainder_cents)} as invoice credit"}}
    return {"text": text, "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text}},
                                     {"type": "actions", "elements": [button]}]}


def home_view(mine: list[Case], waiting: list[Case]) -> dict:
    def line(case: Case) -> dict:
        text = (f"*#{case.id}* {case.instance_id} · {fmt_money(case.credit_cents)} · {case.state}"
                f" · needs level {case.required_level}")
        return {"type": "section", "text": {"type": "mrkdwn", "text": text}}

    def note(text: str) -> dict:
        return {"type": "context", "elements": [{"type": "mrkdwn", "text": text}]}
    blocks = [{"type": "header", "text": {"type": "plain_text", "text": "My open cases"}}]
    blocks += [line(c) for c in mine[:20]] or [note("None. Start one with `/billing-check <instance-id>`.")]
    blocks.append({"type": "header", "text": {"type": "plain_text", "text": "Waiting for my approval"}})
    blocks += [line(c) for c in waiting[:20]] or [note("Nothing is waiting for you.")]
    return {"type": "home", "blocks": blocks[:100]}
