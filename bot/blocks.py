"""Every Block Kit payload the bot sends, and Slack's mention syntax: small pure functions (the case
message is still laid out by its template), held to Block Kit's limits. User text is escaped."""
from __future__ import annotations


from handlers.cases import Case, other_method
from handlers.coverage import check_again, coverage_line, kind_title, next_step, no_findings_text
from handlers.pipeline import id_ranges
from handlers.timeline import fmt_money, hours_text
from services.remediation import batch_ticket as batch_name  # the batch's one name: also its ticket id

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


def _mrkdwn(text: str) -> dict:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def _context(text: str) -> dict:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": text}]}


def _button(action_id: str, case_id: int, text: str, style: str | None = None) -> dict:
    b = {"type": "button", "action_id": action_id, "value": str(case_id), "text": {"type": "plain_text", "text": text}}
    if style:
        b["style"] = style
    return b


def case_message(case, config, customer_name: str | None = None, status: str | None = None) -> dict:
    """The case message (SPEC 5). Coverage comes first: a case that could not judge every kind
    never reads as an all-clear. Buttons carry only the case id; the amount is the stored one.
    status: a line that says more than the state does (a refund pending in Polar)."""
    view = _view(case)
    r = view["report"]
    cov = r.get("coverage")
    partial = not cov or cov.get("state") == "partial"
    findings = r["findings"]
    shown = findings[:MAX_FINDINGS_IN_MESSAGE]
    levels = level_text(config, view["required_level"])
    mark = ":warning: " if partial else (":grey_question: " if cov.get("state") == "no_records" else ":white_check_mark: ")
    head = mark + coverage_line(cov)
    if partial and cov and cov.get("why"):
        head += "\n• " + "\n• ".join(cov["why"])
    if partial and findings:
        head += (f"\nThe credit covers only what could be judged: {check_again(r['sources'])} before approving; "
                 "the amount may change.")
    who = f"{customer_name} ({r['customer_id']})" if customer_name else r["customer_id"]
    periods = ", ".join(r["periods"]) + (f"  ·  ticket {view['ticket_id']}" if view["ticket_id"] else "")
    subject = _subject(r)
    multi = r.get("instance_id") is None
    if multi:
        ids = [i["instance_id"] for i in r.get("instances") or ()]
        orgs = r.get("org_ids") or ([r["org_id"]] if r.get("org_id") else [])
        instance_field = f"*Instances*\n{len(ids)}: " + ", ".join(ids[:8]) + (", …" if len(ids) > 8 else "")
        org_field = f"*Org*\n{', '.join(orgs[:3]) + (', …' if len(orgs) > 3 else '') if orgs else 'several'}"
    else:
        instance_field = f"*Instance*\n{r['instance_id']} (true tier {r['true_tier']})"
        org_field = f"*Org*\n{r['org_id']}"
    blocks = [
        {"type": "header", "text": {"type": "plain_text", "text": cut_text(f"Billing case #{view['id']} · {subject}", 150)}},
        _mrkdwn(head),
        {"type": "section", "fields": [
            {"type": "mrkdwn", "text": f"*Customer*\n{who}"}, {"type": "mrkdwn", "text": org_field},
            {"type": "mrkdwn", "text": instance_field},
            {"type": "mrkdwn", "text": f"*Periods*\n{periods}"}]},
        {"type": "divider"},
    ]
    if multi:
        blocks += _instance_blocks(r, cov)
        shown = findings  # listed by instance above
    for f in ([] if multi else shown):
        unsure = "  _(not fully judged)_" if cov and f["kind"] in cov.get("kinds", []) else ""
        evidence = ("\n• " + "\n• ".join(f["evidence"][:2])) if f["evidence"] else ""
        blocks.append(_mrkdwn(f"*{kind_title(f['kind'])}* — *{fmt_money(f['credit_cents'])}*{unsure}\n"
                              f"{f['summary']}{evidence}"))
    if len(findings) > len(shown):
        blocks.append(_context(f"…and {len(findings) - len(shown)} more findings in the thread"))
    if not findings:
        blocks.append(_mrkdwn(no_findings_text(cov, r["periods"], len(r["credited_before"])) + "\n" + next_step(
            cov, credit_cents=0, level_text=levels, instance_id=r["instance_id"] or subject, periods=r["periods"],
            sources=r["sources"], credited_before=len(r["credited_before"]))))
    blocks += [_context(c["text"]) for c in r["credited_before"]]
    if view["state"] == "pending" and view["method"] == "refund":
        blocks += [_context(note) for note in refund_room_notes(r)]
    if view["exposure_cents"]:
        blocks.append(_context(
            f"Needs level {config.level_label(view['required_level'])} for "
            f"{fmt_money(view['credit_cents'] + view['exposure_cents'])}: this credit plus "
            f"{fmt_money(view['exposure_cents'])} credited to or awaiting {escape(view['customer_id'])} "
            f"in the last {config.exposure_window.days} days."))
    lowered = (f" (lowered from {fmt_money(view['proposed_cents'])})"
               if view["credit_cents"] != view["proposed_cents"] else "")
    systematic = ""
    if view["systematic"]:
        systematic = (" :rotating_light: systematic: engineering is told" if config.channels.get("engineering")
                      else " :rotating_light: systematic (no engineering channel is configured to tell)")
    blocks += [
        {"type": "divider"},
        _mrkdwn(f"*Credit {fmt_money(view['credit_cents'])}*{lowered}  ·  needs {levels}{systematic}"),
        _context(f"Sources: database {r['sources']['database']} · kubernetes {r['sources']['kubernetes']} · "
                 f"polar {r['sources']['polar']}  ·  opened by <@{view['requested_by']}>"),
    ]
    if view["state"] == "pending":
        method = "refund" if view["method"] == "refund" else "invoice credit"
        other = "invoice credit" if view["method"] == "refund" else "refund"
        blocks.append({"type": "actions", "block_id": f"case_actions_{view['id']}", "elements": [
            _button("case_approve", view["id"], f"Approve {fmt_money(view['credit_cents'])} ({method})", "primary"),
            _button("case_approve_other_method", view["id"], f"Approve as {other}"),
            _button("case_adjust", view["id"], "Adjust"),
            _button("case_reject", view["id"], "Reject", "danger")] + remediate_buttons(view)})
    else:
        blocks.append(_context(status or status_line(view)))
    return enforce_limits({"text": f"Billing case #{view['id']} for {subject}: credit "
                                   f"{fmt_money(view['credit_cents'])}", "blocks": blocks})


def leading_kind(findings: list[dict]) -> str | None:
    """The finding kind with the largest credit (the first of equals), as issuing names a case's kind."""
    return max(findings, key=lambda f: f["credit_cents"])["kind"] if findings else None


def remediate_button(finding_kind: str, period: str, text: str = "Remediate all") -> dict:
    """SPEC 5.3's plan for one finding kind and month; the listener (action_id remediate_plan) reads
    "<finding kind> <YYYY-MM>" from the value and builds the plan from the data, not from the message."""
    return {"type": "button", "action_id": "remediate_plan", "value": f"{finding_kind} {period}",
            "text": {"type": "plain_text", "text": text[:75]}}


def remediate_buttons(view: dict) -> list[dict]:
    """A pending systematic case offers its leading kind's plan over the case's latest period."""
    r = view["report"]
    kind = leading_kind(r.get("findings") or [])
    if view["state"] != "pending" or not view["systematic"] or kind is None or not r.get("periods"):
        return []
    return [remediate_button(kind, max(r["periods"]))]


MAX_INSTANCES_IN_MESSAGE = 10


def _subject(report: dict) -> str:
    """What a case is about: its instance, or its customer and how many instances (Case.subject)."""
    if report.get("instance_id"):
        return report["instance_id"]
    n = len(report.get("instances") or ())
    return f"{report.get('customer_id')} ({n} instance{'s' if n != 1 else ''})"


def _instance_blocks(report: dict, cov) -> list[dict]:
    """A case over several instances: its findings grouped by instance (the largest first), the
    instances without findings in one line. `report` is already escaped."""
    rows = sorted(report.get("instances") or (), key=lambda i: (-i["credit_cents"], i["instance_id"]))
    with_findings = [i for i in rows if i["findings"]]
    out = []
    for i in with_findings[:MAX_INSTANCES_IN_MESSAGE]:
        lines = []
        for f in i["findings"][:3]:
            unsure = "  _(not fully judged)_" if cov and f["kind"] in cov.get("kinds", []) else ""
            lines.append(f"• {kind_title(f['kind'])} {fmt_money(f['credit_cents'])}{unsure}: {f['summary']}")
        if len(i["findings"]) > 3:
            lines.append(f"• …and {len(i['findings']) - 3} more findings in the thread")
        out.append(_mrkdwn(f"*{i['instance_id']}* — *{fmt_money(i['credit_cents'])}*\n" + "\n".join(lines)))
    if len(with_findings) > MAX_INSTANCES_IN_MESSAGE:
        out.append(_context(f"…and {len(with_findings) - MAX_INSTANCES_IN_MESSAGE} more instances with findings "
                            "in the thread"))
    clean = [i["instance_id"] for i in rows if not i["findings"]]
    if clean and with_findings:
        out.append(_context(f"No findings on {len(clean)} instance{'s' if len(clean) != 1 else ''}: "
                            + ", ".join(clean[:20]) + (", …" if len(clean) > 20 else "")))
    return out


def refund_room_notes(report: dict) -> list[str]:
    """Before approval: where a refund would exceed what its order can still take (SPEC 4), so the
    approver is not surprised by a capped refund."""
    notes = []
    room = report.get("refund_room") or {}
    for period, cents in sorted((report.get("credit_by_period") or {}).items()):
        r = room.get(period)
        if r is None or not cents:
            continue
        if r["invoice"] is None:
            notes.append(f":information_source: {period} is not invoiced yet: a refund is not possible; approve it "
                         "as invoice credit (it appears on the next invoice).")
        elif cents > r["refundable_cents"]:
            notes.append(f":information_source: Order {escape(r['invoice'])} ({period}) can still refund "
                         f"{fmt_money(r['refundable_cents'])} of the {fmt_money(cents)} for {period}: the rest "
                         "would be offered as invoice credit.")
    return notes


def escaped_report(report: dict) -> dict:
    """The report with every piece of text that came from outside (control-plane log lines, Polar,
    people) escaped, so none of it can ping @channel or forge a link in Slack."""
    def esc_list(items):
        return [escape(x) for x in items or []]
    out = dict(report)
    out["findings"] = [{**f, "summary": escape(f["summary"]), "evidence": esc_list(f["evidence"])}
                       for f in report.get("findings", [])]
    out["notes"] = esc_list(report.get("notes"))
    out["systematic_reasons"] = esc_list(report.get("systematic_reasons"))
    out["credited_before"] = [{**c, "text": escape(c.get("text", ""))} for c in report.get("credited_before", [])]
    if report.get("coverage"):
        out["coverage"] = {**report["coverage"], "why": esc_list(report["coverage"].get("why"))}
    if report.get("instances"):
        out["instances"] = [{**i, "findings": [{**f, "summary": escape(f["summary"]), "evidence": esc_list(f["evidence"])}
                                               for f in i.get("findings") or ()],
                             "notes": esc_list(i.get("notes"))} for i in report["instances"]]
    if report.get("customer_id"):
        out["customer_id"] = escape(report["customer_id"])
    return out


def _view(case) -> dict:
    """The case as the template reads it, with every piece of typed text escaped."""
    view = {k: case.get(k) for k in ("id", "state", "method", "report", "credit_cents", "proposed_cents",
                                     "required_level", "systematic", "ticket_id", "requested_by", "decided_by",
                                     "reason", "issued_cents", "polar_reference", "customer_id")}
    view["exposure_cents"] = case.get("exposure_cents") or 0
    view["report"] = escaped_report(view["report"])
    if view["ticket_id"]:
        view["ticket_id"] = escape(view["ticket_id"])
    return view


def evidence_messages(report: dict, limit: int = MAX_TEXT) -> list[str]:
    """The full evidence for the thread, split into messages under Slack's text limit. It opens with
    the coverage, so the thread never reads as an all-clear the check could not give."""
    report = escaped_report(report)
    cov = report.get("coverage")
    out: list[str] = []
    current = ""
    lines = [coverage_line(cov)]
    if cov and cov.get("state") == "partial":
        lines += [f"• {w}" for w in cov.get("why", [])]
    def finding_lines(f: dict) -> list[str]:
        hours = f["hours"].rstrip("0").rstrip(".")
        return [f"*{kind_title(f['kind'])}* {fmt_money(f['credit_cents'])} ({hours} h; "
                f"{id_ranges(f['record_ids'])})", f["summary"]] + [f"• {e}" for e in f["evidence"]]
    if report.get("instance_id") is None and report.get("instances") is not None:
        for i in sorted(report["instances"], key=lambda i: (-i["credit_cents"], i["instance_id"])):
            if not i["findings"]:
                continue
            lines.append(f"*Instance {i['instance_id']}* ({i.get('org_id') or '?'}): {fmt_money(i['credit_cents'])}")
            for f in i["findings"]:
                lines += finding_lines(f)
    else:
        for f in report["findings"]:
            lines += finding_lines(f)
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


def usage_report_message(report) -> dict:
    """`/billing-report usage`: services.usage_report.UsageReport as Block Kit, one section per top
    customer (charges, hours, instances, credits, anomalies by kind, watchlist), held to the limits."""
    head = (f"*{report.total_customers} customers billed* · {hours_text(report.total_hours)} h · "
            f"{fmt_money(report.total_charge_cents)}")
    blocks = [{"type": "header", "text": {"type": "plain_text", "text": f"Usage in {report.month}"}},
              _mrkdwn(head), _context(escape(report.coverage_text()))]
    if not report.customers:
        blocks.append(_mrkdwn("No billing records in the month."))
    for i, c in enumerate(report.customers, 1):
        line = (f"*{i}. {escape(c.customer_id)}* · {fmt_money(c.charge_cents)} · {hours_text(c.hours)} h · "
                f"{c.instances} instance{'s' if c.instances != 1 else ''}"
                + ("  :eyes: *watchlist*" if c.watched else "")
                + f"\nCredits issued in the month: {c.credits} for {fmt_money(c.credits_cents)}")
        if report.reconciled_days:
            line += f"\nAnomalies: {escape(c.anomalies_text())}"
        blocks.append(_mrkdwn(line))
    return enforce_limits({"text": f"Usage in {report.month}: {report.total_customers} customers billed, "
                                   f"{fmt_money(report.total_charge_cents)}", "blocks": blocks})


def home_view(mine: list[Case], waiting: list[Case]) -> dict:
    def line(case: Case) -> dict:
        text = (f"*#{case.id}* {escape(case.subject)} · {fmt_money(case.credit_cents)} · {case.state}"
                f" · needs level {case.required_level}")
        return {"type": "section", "text": {"type": "mrkdwn", "text": text}}

    def note(text: str) -> dict:
        return {"type": "context", "elements": [{"type": "mrkdwn", "text": text}]}
    blocks = [{"type": "header", "text": {"type": "plain_text", "text": "My open cases"}}]
    blocks += [line(c) for c in mine[:20]] or [note("None. Start one with `/billing-check <instance-id>`.")]
    blocks.append({"type": "header", "text": {"type": "plain_text", "text": "Waiting for my approval"}})
    blocks += [line(c) for c in waiting[:20]] or [note("Nothing is waiting for you.")]
    return {"type": "home", "blocks": blocks[:100]}


# --- remediation batches (SPEC 5.3) ------------------------------------------------------------------

MAX_PLAN_HELD = 10
MAX_PROGRESS_FAILURES = 15
MAX_PROGRESS_WAITING = 20


def plan_message(batch: dict, plan, config, status: str | None = None) -> dict:
    """The plan of a batch: its totals, the largest customers, what it lists but does not credit,
    and Approve / Reject (value: the batch id). With `status`, the decided plan: no buttons.
    An empty plan says so plainly, with no buttons."""
    name = batch_name(batch["id"])
    head = f"Remediation plan {name}: {plan.kind} {plan.period}"
    level = batch["required_level"]
    hours = format(plan.hours.normalize(), "f") if plan.customers else "0"
    blocks = [{"type": "header", "text": {"type": "plain_text", "text": cut_text(head, 150)}}]
    if not plan.customers:
        blocks.append(_mrkdwn(f"Nothing to remediate: no instance billed in {plan.period} has a "
                              f"{kind_title(plan.kind)} finding left to credit "
                              f"({plan.instances_checked} instance{'s' if plan.instances_checked != 1 else ''} "
                              "checked)."))
    else:
        blocks.append({"type": "section", "fields": [
            {"type": "mrkdwn", "text": f"*Customers*\n{len(plan.customers)}"},
            {"type": "mrkdwn", "text": f"*Instances*\n{plan.instance_count} (of {plan.instances_checked} checked)"},
            {"type": "mrkdwn", "text": f"*Hours*\n{hours}"},
            {"type": "mrkdwn", "text": f"*Total credit*\n{fmt_money(plan.total_cents)}"},
            {"type": "mrkdwn", "text": f"*Needs*\nlevel {config.level_label(level)}"}]})
        lines = [f"{n}. {escape(c.customer_id)}: {fmt_money(c.credit_cents)} ({format(c.hours.normalize(), 'f')} h, "
                 f"{len(c.instance_ids)} instance{'s' if len(c.instance_ids) != 1 else ''})"
                 for n, c in enumerate(plan.largest(10), 1)]
        more = len(plan.customers) - len(lines)
        blocks.append(_mrkdwn("*Largest customers*\n" + "\n".join(lines)
                              + (f"\n…and {more} more in the CSV" if more > 0 else "")))
    if plan.other_kinds:
        blocks.append(_context("Also found, not credited by this plan (each needs its own case or plan): "
                               + ", ".join(f"{k} ({n} customer{'s' if n != 1 else ''})"
                                           for k, n in plan.other_kinds.items())))
    if plan.held:
        held = [f"{escape(c)} ({escape(i)}: case #{case_id}, {state})" for c, i, case_id, state in plan.held[:MAX_PLAN_HELD]]
        extra = len(plan.held) - len(held)
        blocks.append(_context("Left out, another case holds that time: " + "; ".join(held)
                               + (f"; …and {extra} more" if extra > 0 else "")))
    by = batch["requested_by"]
    who = f"`billing-bot remediate` ({escape(by[4:])})" if by.startswith("cli:") else f"<@{by}>"
    blocks.append(_context(f"Planned by {who}"
                           + ("  ·  the CSV of every customer is in the thread" if plan.customers else "")))
    if status:
        blocks.append(_context(status))
    elif plan.customers:
        blocks.append({"type": "actions", "block_id": f"batch_actions_{batch['id']}", "elements": [
            _button("batch_approve", batch["id"], f"Approve {fmt_money(plan.total_cents)} for "
                                                  f"{len(plan.customers)} customers", "primary"),
            _button("batch_reject", batch["id"], "Reject", "danger")]})
    summary = (f"{head}: {len(plan.customers)} customers, {fmt_money(plan.total_cents)}, needs level "
               f"{config.level_label(level)}" if plan.customers else f"{head}: nothing to remediate")
    return enforce_limits({"text": summary, "blocks": blocks})


def progress_message(batch: dict, progress) -> dict:
    """The batch's one progress message (SPEC 5.3): the headline, each failure with its reason and
    the case's own Retry button (the case retry path checks authority), the cases waiting for a
    decision. Its `text` says everything the blocks say, so it is what a replica claims."""
    name = batch_name(batch["id"])
    mark = ":white_check_mark:" if progress.settled else (
        ":warning:" if progress.failed else ":hourglass:")
    headline = f"{mark} {name} ({batch['kind']} {batch['period']}): {progress.headline()}"
    blocks = [_mrkdwn(headline)]
    lines = [headline]
    shown = progress.failed[:MAX_PROGRESS_FAILURES]
    for c in shown:
        text = (f":x: Case #{c.case_id} ({escape(c.customer_id)}, {fmt_money(c.credit_cents)}) failed: "
                f"{escape(c.reason or 'no reason given')}")
        lines.append(text)
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": cut_text(text)},
                       "accessory": {"type": "button", "action_id": "case_retry", "value": f"{c.case_id}:{c.failures}",
                                     "text": {"type": "plain_text", "text": "Retry"}}})
    if len(progress.failed) > len(shown):
        more = f"…and {len(progress.failed) - len(shown)} more failed"
        lines.append(more)
        blocks.append(_context(more))
    if progress.waiting:
        waiting = [f"#{c.case_id} {escape(c.customer_id)} ({fmt_money(c.credit_cents)}"
                   + (f", the rest of #{c.remainder_of} as invoice credit)" if c.remainder_of else ")")
                   for c in progress.waiting[:MAX_PROGRESS_WAITING]]
        extra = len(progress.waiting) - len(waiting)
        text = ("Waiting for a decision of their own (the check changed, or the customer's recent credits need a "
                "higher level): " + ", ".join(waiting) + (f", …and {extra} more" if extra > 0 else ""))
        lines.append(text)
        blocks.append(_context(text))
    if progress.closed:
        text = "Closed without credit: " + ", ".join(f"#{c.case_id} {escape(c.customer_id)} ({c.state})"
                                                     for c in progress.closed[:MAX_PROGRESS_WAITING])
        lines.append(text)
        blocks.append(_context(text))
    return enforce_limits({"text": cut_text("\n".join(lines), 4000), "blocks": blocks})


def batch_reject_modal(batch: dict) -> dict:
    return _modal("batch_reject_modal", f"Reject {batch_name(batch['id'])}", "Reject", str(batch["id"]), [
        _input("reason", "Why is this plan rejected?", multiline=True, min_length=3)])
