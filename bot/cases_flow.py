"""Opening a case from Slack: 'Investigating…', the check, the case message, escalation."""
from __future__ import annotations

import logging
import time

from slack_sdk.errors import SlackApiError

from bot import slack_io
from bot.context import BotContext
from services.approvals import authority_of, holders
from services.investigation import InputError, PERIOD, validate_instance_id, validate_period

log = logging.getLogger(__name__)


def parse_check_text(text: str) -> tuple[str, list[str] | None, str | None]:
    """'<instance-id> [YYYY-MM] [ticket]' -> (instance, periods, ticket). Raises InputError."""
    parts = text.split()
    if not parts:
        raise InputError("usage: /billing-check <instance-id> [YYYY-MM] [ticket]")
    instance = validate_instance_id(parts[0])
    periods, ticket = None, None
    rest = parts[1:]
    if rest and (PERIOD.fullmatch(rest[0]) or rest[0][:4].isdigit() and "-" in rest[0]):
        periods = [validate_period(rest.pop(0))]
    if rest:
        ticket = rest.pop(0)
    if rest:
        raise InputError(f"unexpected {' '.join(rest)!r}: usage: /billing-check <instance-id> [YYYY-MM] [ticket]")
    return instance, periods, ticket


async def open_case(ctx: BotContext, *, channel: str, user: str, instance_id: str, periods: list[str] | None,
                    ticket: str | None) -> dict | None:
    posted = await ctx.client.chat_postMessage(channel=channel, text=f":mag: Investigating {instance_id}…")
    ts = posted["ts"]
    started = time.perf_counter()
    try:
        report = await ctx.investigator.check(instance_id, periods)
    except InputError as exc:
        await ctx.client.chat_update(channel=channel, ts=ts, text=f":warning: {exc}")
        return None
    except Exception as exc:  # the database is down: say so where the agent is looking
        log.exception("check of %s failed", instance_id)
        await ctx.client.chat_update(channel=channel, ts=ts,
                                     text=f":x: Could not investigate {instance_id}: {type(exc).__name__}. Try again shortly.")
        return None
    ctx.metrics.check_seconds.observe(time.perf_counter() - started)
    data = report.as_json()
    auth = await authority_of(ctx.config, ctx.groups, user)
    needs_others = data["credit_cents"] > 0 and not auth.covers(data["credit_cents"])
    approvers = await holders(ctx.config, ctx.groups, data["required_level"]) if data["required_level"] else {}
    case = await ctx.cases.create_case(
        report=data, covered=report.result.covered, requested_by=user, ticket_id=ticket, channel_id=channel,
        approvers=approvers, method=ctx.config.polar.credit_method,
        remind_after_s=ctx.config.remind_every.total_seconds() if needs_others else None)
    case = await ctx.cases.set_message(case["id"], channel, ts)
    await slack_io.refresh_case_message(ctx, case)
    try:
        await slack_io.post_evidence(ctx, case)
        if needs_others:
            await slack_io.ping_level(ctx, case, f"Opened by <@{user}>, whose authority does not cover it.")
        if case["systematic"] and case["state"] == "pending":
            await slack_io.report_systematic(ctx, case)
    except SlackApiError as exc:
        log.warning("case %s posted, but a follow-up failed: %s", case["id"], exc.response.get("error"))
    return case
