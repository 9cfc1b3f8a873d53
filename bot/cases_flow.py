"""Opening a case from Slack: 'Investigating…', the check, the case message, escalation. A second
check of an instance whose time an open case holds shows that case instead (SPEC 2.2)."""
from __future__ import annotations

import logging
import time

import psycopg
from psycopg_pool import PoolTimeout
from slack_sdk.errors import SlackApiError
from slack_sdk.webhook.async_client import AsyncWebhookClient

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


CANNOT_POST = {"channel_not_found", "not_in_channel", "is_archived", "restricted_action", "cannot_dm_bot"}


async def respond(response_url: str | None, text: str) -> bool:
    """Answer through the command's response_url (works where the bot cannot post)."""
    if not response_url:
        return False
    try:
        r = await AsyncWebhookClient(response_url).send(text=text, response_type="ephemeral")
        return r.status_code == 200
    except Exception as exc:
        log.warning("could not answer through response_url: %s", type(exc).__name__)
        return False


async def open_case(ctx: BotContext, *, channel: str, user: str, instance_id: str, periods: list[str] | None,
                    ticket: str | None, response_url: str | None = None) -> Case | None:
    """Open a case and show it. Any failure to reach Slack is told to the requester somewhere (the
    command's response_url, or a direct message), never only to the log."""
    try:
        return await _open_case(ctx, channel=channel, user=user, instance_id=instance_id, periods=periods,
                                ticket=ticket, response_url=response_url)
    except Exception as exc:
        log.exception("opening a case for %s failed", instance_id)
        told = await respond(response_url, f":x: Could not open a case for {instance_id}: {type(exc).__name__}. "
                                           "Try again shortly.")
        if not told:
            await slack_io.ephemeral(ctx, None, user, f":x: Could not open a case for {instance_id}: "
                                                      f"{type(exc).__name__}. Try again shortly.")
        return None


async def _start(ctx: BotContext, channel: str, user: str, instance_id: str, response_url: str | None
                 ) -> tuple[str, str]:
    """The "Investigating…" message that becomes the case: in the channel, or, where the bot cannot
    post (a private channel or a DM it is not in), in a direct message to the requester, with one
    line through the response_url saying how to invite the bot."""
    try:
        posted = await ctx.client.chat_postMessage(channel=channel, text=f":mag: Investigating {instance_id}…")
        return posted["channel"], posted["ts"]
    except SlackApiError as exc:
        error = exc.response.get("error")
        if error not in CANNOT_POST:
            raise
    await respond(response_url, (
        f":information_source: I can't post in this channel ({error}), so the case for {instance_id} comes to you "
        "in a direct message. To have cases here, invite me: `/invite @billing-bot`."))
    posted = await ctx.client.chat_postMessage(channel=user, text=f":mag: Investigating {instance_id}…")
    return posted["channel"], posted["ts"]


async def _open_case(ctx: BotContext, *, channel: str, user: str, instance_id: str, periods: list[str] | None,
                     ticket: str | None, response_url: str | None = None) -> Case | None:
    channel, ts = await _start(ctx, channel, user, instance_id, response_url)
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
        what = ("the database is unavailable" if isinstance(exc, (psycopg.OperationalError, PoolTimeout))
                else type(exc).__name__)
        await ctx.client.chat_update(channel=channel, ts=ts,
                                     text=f":x: Could not investigate {instance_id}: {what}. Try again shortly.")
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
