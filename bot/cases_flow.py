"""Opening a case from Slack: 'Investigating…', the check, the case message, escalation. A second
check of an instance whose time an open case holds shows that case instead (SPEC 2.2)."""
from __future__ import annotations

import logging
import time

from bot import slack_io
from bot.blocks import escape
from bot.context import BotContext
from handlers.cases import Case
from handlers.timeline import fmt_money
from services.cases import CheckRequest, StaleEvidence
from services.inputs import InputError, validate_period, validate_ticket

log = logging.getLogger(__name__)
USAGE = "usage: /billing-check <instance-id> [YYYY-MM] [ticket]"


def parse_check_text(text: str) -> tuple[str, list[str] | None, str | None]:
    """'<instance-id> [YYYY-MM] [ticket]' -> (instance, periods, ticket). Raises InputError."""
    from services.inputs import validate_instance_id

    parts = text.split()
    if not parts:
        raise InputError(USAGE)
    instance = validate_instance_id(parts[0])
    periods, ticket = None, None
    rest = parts[1:]
    if rest and rest[0][:4].isascii() and rest[0][:4].isdigit() and "-" in rest[0]:
        periods = [validate_period(rest.pop(0))]
    if rest:
        ticket = validate_ticket(rest.pop(0))
    if rest:
        raise InputError(f"unexpected {escape(' '.join(rest))!r}: {USAGE}")
    return instance, periods, ticket


async def open_case(ctx: BotContext, *, channel: str, user: str, instance_id: str, periods: list[str] | None,
                    ticket: str | None, response_url: str | None = None) -> Case | None:
    posted = await ctx.client.chat_postMessage(channel=channel, text=f":mag: Investigating {instance_id}…")
    ts = posted["ts"]
    started = time.perf_counter()
    try:
        out = await ctx.cases.open(CheckRequest(instance_id, periods, user, ticket, channel, response_url))
    except InputError as exc:
        await ctx.client.chat_update(channel=channel, ts=ts, text=f":warning: {escape(exc)}")
        return None
    except StaleEvidence as exc:
        await ctx.client.chat_update(channel=channel, ts=ts, text=f":warning: Could not open a case: {exc}. Try again.")
        return None
    except Exception as exc:  # the database is down: say so where the agent is looking
        log.exception("check of %s failed", instance_id)
        await ctx.client.chat_update(channel=channel, ts=ts,
                                     text=f":x: Could not investigate {instance_id}: {type(exc).__name__}. Try again shortly.")
        return None
    ctx.metrics.check_seconds.observe(time.perf_counter() - started)
    if out.status == "existing":
        await ctx.client.chat_update(channel=channel, ts=ts, text=await _existing_text(ctx, out.case))
        return out.case
    case = await ctx.cases.attach_message(out.case, channel, ts)
    await slack_io.refresh_case_message(ctx, case)
    await slack_io.safely("evidence", case.id, slack_io.post_evidence(ctx, case))
    if case.state == "pending" and case.get("next_remind_at") is not None:
        await slack_io.safely("ping", case.id, slack_io.ping_level(
            ctx, case, f"Opened by <@{user}>, whose authority does not cover it."))
    if case.systematic and case.state == "pending":
        await slack_io.safely("engineering", case.id, slack_io.report_systematic(ctx, case))
    return case


async def _existing_text(ctx: BotContext, case: Case) -> str:
    link = await slack_io.permalink(ctx, case)
    waits = {"pending": f"waiting for level {ctx.config.level_label(case.required_level)} to decide",
             "approved": "approved, issuing in Polar", "issuing": "issuing in Polar",
             "failed": "issuing failed, waiting for a retry"}[case.state]
    return (f":information_source: Case #{case.id} already holds this billed time of {case.instance_id} "
            f"({', '.join(case.periods)}): {fmt_money(case.credit_cents)}, {waits}. {link}\n"
            "No second case was opened, so nothing can be credited twice. To check other periods, name them.")
