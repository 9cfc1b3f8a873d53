"""/billing-report [week|month]: the credits review; /billing-report usage [YYYY-MM]: the monthly
audit of high-usage accounts (services/usage_report.py) as Block Kit. Both answer privately to
whoever asked; a malformed argument is a specific ephemeral error and nothing is read."""
from __future__ import annotations

import logging
from datetime import datetime, timezone

from slack_sdk.errors import SlackApiError
from slack_sdk.webhook.async_client import AsyncWebhookClient

from bot.blocks import escape, usage_report_message
from bot.context import ctx_of
from services.credits_report import credits_report, since_for
from services.inputs import InputError, validate_month
from services.usage_report import usage_report

log = logging.getLogger(__name__)
USAGE = "usage: /billing-report [week|month] · /billing-report usage [YYYY-MM] (default: this month)"


def parse_usage_month(args: list[str], now: datetime) -> str:
    """The month of `usage [YYYY-MM]`: this month (UTC) when none is given."""
    if not args:
        return now.astimezone(timezone.utc).strftime("%Y-%m")
    if len(args) > 1:
        raise InputError(f"usage takes one month, got {escape(' '.join(args))!r}: {USAGE}")
    try:
        return validate_month(args[0])
    except InputError:
        raise InputError(f"{escape(args[0])!r} is not a month: expected YYYY-MM with a month 01-12, "
                         f"like 2026-10 ({USAGE})") from None


async def billing_report(ack, command, client, context) -> None:
    ctx = ctx_of(context)
    ctx.metrics.commands.labels("billing-report").inc()
    words = (command.get("text") or "").split()
    span = (words[0] if words else "week").lower()
    if span == "usage":
        try:
            month = parse_usage_month(words[1:], datetime.now(timezone.utc))
        except InputError as exc:
            await ack(response_type="ephemeral", text=f":warning: {exc}")
            return
        await ack()
        ctx.spawn(_answer_usage(ctx, client, command, month), "usage report")
        return
    if span not in ("week", "month") or len(words) > 1:
        await ack(response_type="ephemeral", text=f":warning: unknown span {escape(' '.join(words))!r}: {USAGE}")
        return
    await ack()

    async def answer():
        report = await credits_report(ctx.cases.store, since_for(span, datetime.now(timezone.utc).date()))
        await client.chat_postEphemeral(channel=command["channel_id"], user=command["user_id"],
                                        text=f"```{report.as_text()[:2900]}```")
    ctx.spawn(answer(), "credits report")


async def _answer_usage(ctx, client, command, month: str) -> None:
    try:
        msg = usage_report_message(await usage_report(ctx.cases.store.db, month))
    except Exception as exc:
        log.exception("usage report for %s failed", month)
        msg = {"text": f":x: The usage report for {month} could not be made: {type(exc).__name__}. Try again, "
                       f"or run `billing-bot report --usage --month {month}`."}
    await _answer_privately(client, command, msg)


async def _answer_privately(client, command, msg: dict) -> None:
    """Through the command's response_url (works in any channel, the bot invited or not), else an
    ephemeral message; a failure of both is logged."""
    url = command.get("response_url")
    if url:
        try:
            r = await AsyncWebhookClient(url).send(response_type="ephemeral", **msg)
            if r.status_code == 200:
                return
            log.warning("usage report: response_url answered %s", r.status_code)
        except Exception as exc:
            log.warning("usage report: response_url failed: %s", type(exc).__name__)
    try:
        await client.chat_postEphemeral(channel=command["channel_id"], user=command["user_id"], **msg)
    except SlackApiError as exc:
        log.warning("usage report not delivered to %s: %s", command.get("user_id"), exc.response.get("error"))


def register(app) -> None:
    app.command("/billing-report")(billing_report)
