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
USAGE = ("usage: /billing-check <instance-id> [YYYY-MM] [ticket], or /billing-check customer <customer-id> "
         "[YYYY-MM] [ticket], or /billing-check org <org-id> [YYYY-MM] [ticket]")
GROUPED = ("customer", "org")


def parse_grouped_text(text: str) -> tuple[str, str, list[str] | None, str | None]:
    """'customer|org <id> [YYYY-MM] [ticket]' -> (scope, id, periods, ticket). Raises InputError."""
    from services.inputs import validate_customer_id, validate_org_id

    parts = text.split()
    scope = parts[0].lower() if parts else ""
    if scope not in GROUPED:
        raise InputError(USAGE)
    if len(parts) < 2:
        raise InputError(f"the {scope} id is missing: {USAGE}")
    scope_id = validate_customer_id(parts[1]) if scope == "customer" else validate_org_id(parts[1])
    return (scope, scope_id, *_period_and_ticket(parts[2:]))


def _period_and_ticket(rest: list[str]) -> tuple[list[str] | None, str | None]:
    """'[YYYY-MM] [ticket]' after the instance, customer or org. Raises InputError."""
    periods, ticket = None, None
    rest = list(rest)
    if rest and rest[0][:4].isascii() and rest[0][:4].isdigit() and "-" in rest[0]:
        periods = [validate_period(rest.pop(0))]
    if rest:
        ticket = validate_ticket(rest.pop(0))
    if rest:
        raise InputError(f"unexpected {escape(' '.join(rest))!r}: {USAGE}")
    return periods, ticket


def parse_check_text(text: str) -> tuple[str, list[str] | None, str | None]:
    """'<instance-id> [YYYY-MM] [ticket]' -> (instance, periods, ticket). Raises InputError."""
    from services.inputs import validate_instance_id

    parts = text.split()
    if not parts:
        raise InputError(USAGE)
    instance = validate_instance_id(parts[0])
    return (instance, *_period_and_ticket(parts[1:]))


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
    posted = await post_or_dm(ctx, channel, user, response_url, f"the case for {instance_id}", "cases",
                              text=f":mag: Investigating {instance_id}…")
    return posted["channel"], posted["ts"]


async def post_or_dm(ctx: BotContext, channel: str, user: str, response_url: str | None, what: str, things: str,
                     **message) -> dict:
    """Post in the channel; where the bot cannot (a private channel or a DM it is not in), post
    to the requester's DMs instead and say, through the response_url, how to invite the bot."""
    try:
        return await ctx.client.chat_postMessage(channel=channel, **message)
    except SlackApiError as exc:
        error = exc.response.get("error")
        if error not in CANNOT_POST:
            raise
    await respond(response_url, (
        f":information_source: I can't post in this channel ({error}), so {what} comes to you in a direct message. "
        f"To have {things} here, invite me: `/invite @billing-bot`."))
    return await ctx.client.chat_postMessage(channel=user, **message)


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
    return await _show(ctx, out, channel, ts, user)


async def _show(ctx: BotContext, out, channel: str, ts: str, user: str) -> Case | None:
    """One opened case (or the case already holding the time) in the message at ts."""
    if out.status == "existing":
        await ctx.client.chat_update(channel=channel, ts=ts, text=await _existing_text(ctx, out.case))
        return out.case
    if out.case is None:  # refused: nothing billed to judge
        await ctx.client.chat_update(channel=channel, ts=ts, text=f":information_source: {escape(out.reason)}")
        return None
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
    return (f":information_source: Case #{case.id} already holds this billed time of {escape(case.subject)} "
            f"({', '.join(case.periods)}): {fmt_money(case.credit_cents)}, {waits}. {link}\n"
            "No second case was opened, so nothing can be credited twice. To check other periods, name them.")


async def open_grouped(ctx: BotContext, *, scope: str, scope_id: str, channel: str, user: str,
                       periods: list[str] | None, ticket: str | None, response_url: str | None = None) -> list[Case]:
    """`/billing-check customer|org <id>`: one case per customer over every instance billed in
    the periods, each posted as a case message like an instance's (the first in the
    "Investigating…" message, the others after it)."""
    label = f"{scope} {scope_id}"
    try:
        channel, ts = await _start(ctx, channel, user, label, response_url)
    except Exception as exc:
        log.exception("check of %s failed", label)
        if not await respond(response_url, f":x: Could not check {label}: {type(exc).__name__}. Try again shortly."):
            await slack_io.ephemeral(ctx, None, user, f":x: Could not check {label}: {type(exc).__name__}.")
        return []
    started = time.perf_counter()
    req = CheckRequest("", periods, user, ticket, channel, response_url)
    try:
        outs = await (ctx.cases.open_customer(scope_id, req) if scope == "customer" else ctx.cases.open_org(scope_id, req))
    except InputError as exc:
        await ctx.client.chat_update(channel=channel, ts=ts, text=f":warning: {escape(exc)}")
        return []
    except Exception as exc:
        log.exception("check of %s failed", label)
        what = ("the database is unavailable" if isinstance(exc, (psycopg.OperationalError, PoolTimeout))
                else type(exc).__name__)
        await ctx.client.chat_update(channel=channel, ts=ts, text=f":x: Could not investigate {escape(label)}: {what}. "
                                                                  "Try again shortly.")
        return []
    ctx.metrics.check_seconds.observe(time.perf_counter() - started)
    shown: list[Case] = []
    for n, out in enumerate(outs):
        if n:
            posted = await ctx.client.chat_postMessage(channel=channel, text=f":mag: {escape(label)}: case {n + 1} "
                                                                             f"of {len(outs)}…")
            ts = posted["ts"]
        try:
            case = await _show(ctx, out, channel, ts, user)
        except Exception:
            log.exception("showing a case of %s failed", label)
            continue
        if case is not None:
            shown.append(case)
    return shown
