"""The Slack calls listeners share, and how an outcome of the case service is shown to people.

Slack is told after the database has recorded a decision and the money path has started: a Slack
error here is logged with the case id and never undoes or blocks a case. The Web API client
retries rate limits and dropped connections itself (bot/app.py installs its retry handlers).
"""
from __future__ import annotations

import logging

from slack_sdk.errors import SlackApiError

from bot.blocks import case_message, escape, evidence_messages, mention_text
from bot.context import BotContext
from handlers.cases import Case, can, state_refusal
from handlers.timeline import fmt_money
from services.approvals import everyone, holders
from services.cases import Outcome

log = logging.getLogger(__name__)


async def ephemeral(ctx: BotContext, channel: str | None, user: str, text: str) -> None:
    try:
        if channel:
            await ctx.client.chat_postEphemeral(channel=channel, user=user, text=text)
        else:
            await ctx.client.chat_postMessage(channel=user, text=text)
    except SlackApiError as exc:
        log.warning("could not tell %s: %s", user, exc.response.get("error"))


def button_ids(body: dict) -> tuple[str, str | None, int, int | None]:
    """(user, channel, case id, failure number or None) from a block_actions payload whose button
    carries "<case id>" or "<case id>:<failure number>"."""
    raw = body["actions"][0]["value"]
    case_id, _, failure = raw.partition(":")
    return (body["user"]["id"], (body.get("channel") or {}).get("id"), int(case_id),
            int(failure) if failure else None)


async def open_decision_modal(ctx: BotContext, client, body: dict, action: str, build_view) -> None:
    """Open Adjust's or Reject's modal at once (Slack's trigger lives 3 s), or say why not."""
    user, channel, case_id, _ = button_ids(body)
    case = await ctx.cases.store.get(case_id)
    if case is None or not can(action, case.state):
        ctx.spawn(ephemeral(ctx, channel, user, state_refusal(case) if case else "No such case."))
        return
    await client.views_open(trigger_id=body["trigger_id"], view=build_view(case))


async def answer_submission(ctx: BotContext, ack, out: Outcome, field: str, user: str, decision: str,
                            done_text: str) -> None:
    """A decision modal's answer: the refusal next to the field (with who can decide), or close it
    and tell the case's message and thread."""
    if not out.ok:
        why = out.reason
        if out.needed_level:
            why += f". Level {ctx.config.level_label(out.needed_level)} can decide this case"
        await ack(response_action="errors", errors={field: why[:2000]})
        return
    await ack()
    ctx.metrics.decisions.labels(decision).inc()
    ctx.spawn(show_outcome(ctx, out, user, out.case.channel_id, done_text), f"{decision} case {out.case.id}")


async def refresh_case_message(ctx: BotContext, case: Case, status: str | None = None) -> None:
    if not case.channel_id or not case.message_ts:
        return
    msg = case_message(case, ctx.config, status=status)
    await ctx.client.chat_update(channel=case.channel_id, ts=case.message_ts, text=msg["text"], blocks=msg["blocks"])


async def post_thread(ctx: BotContext, case: Case, text: str, **kw) -> None:
    if case.channel_id and case.message_ts:
        await ctx.client.chat_postMessage(channel=case.channel_id, thread_ts=case.message_ts, text=text, **kw)


async def post_evidence(ctx: BotContext, case: Case) -> None:
    for text in evidence_messages(case.report):
        await post_thread(ctx, case, text)


async def permalink(ctx: BotContext, case: Case) -> str:
    try:
        r = await ctx.client.chat_getPermalink(channel=case.channel_id, message_ts=case.message_ts)
        return r["permalink"]
    except (SlackApiError, KeyError, TypeError):
        return f"case #{case.id}"


async def ping_level(ctx: BotContext, case: Case, why: str) -> list[str]:
    """Mention the needed level's groups in the escalation channel and DM each of its members."""
    h = await holders(ctx.config, ctx.groups, case.required_level)
    link = await permalink(ctx, case)
    amount = fmt_money(case.deciding_cents)
    text = (f"{mention_text(h)}: billing case #{case.id} for {escape(case.subject)} needs "
            f"level {h['level']} ({h['name']}) to approve {amount}. {why} {link}")
    channel = ctx.config.channels.get("escalation")
    if channel:
        await ctx.client.chat_postMessage(channel=channel, text=text)
    members = [u for u in everyone(h) if not (ctx.config.four_eyes and u == case.requested_by)]
    for user in members:
        try:
            await ctx.client.chat_postMessage(channel=user, text=f"Billing case #{case.id} is waiting for your "
                                              f"approval: {amount} for {escape(case.subject)}. {link}")
        except SlackApiError as exc:
            log.warning("could not DM %s: %s", user, exc.response.get("error"))
    return members


async def report_systematic(ctx: BotContext, case: Case) -> None:
    channel = ctx.config.channels.get("engineering")
    if not channel:
        return
    r = case.report
    reasons = "\n".join(f"• {x}" for x in r.get("systematic_reasons", []))
    kinds = ", ".join(f["kind"] for f in r["findings"])
    link = await permalink(ctx, case)
    await ctx.client.chat_postMessage(channel=channel, text=(
        f":rotating_light: Systematic billing defect (case #{case.id}, {escape(case.subject)}"
        f"{', org ' + escape(case.org_id) if case.org_id else ''})\n"
        f"Kinds: {kinds}; credit {fmt_money(case.credit_cents)}.\n{reasons}\n{link}"))


async def safely(what: str, case_id: int | None, coro) -> None:
    """Await a Slack call whose failure must not reach the person's case: log it with the case."""
    try:
        await coro
    except Exception:
        log.exception("case %s: %s failed in Slack (the case itself is recorded)", case_id, what)


async def show_outcome(ctx: BotContext, out: Outcome, user: str, channel: str | None, done_text: str | None) -> None:
    """Tell people what a decision did: the case message, a line in its thread, or why not."""
    case = out.case
    if out.status == "missing":
        await ephemeral(ctx, channel, user, out.reason)
        return
    if out.status == "refused":
        ctx.metrics.refusals.inc()
        if out.needed_level and case is not None and case.state in ("pending", "failed"):
            h = await holders(ctx.config, ctx.groups, out.needed_level)
            await ephemeral(ctx, channel, user, (
                f":no_entry: {out.reason}. {fmt_money(case.deciding_cents)} needs level {h['level']} ({h['name']}): "
                f"{mention_text(h)}. They have been pinged."))
            await safely("ping", case.id, ping_level(ctx, case, f"<@{user}> tried to decide it and was refused."))
        else:
            await ephemeral(ctx, channel, user, out.reason)
        return
    if out.status == "changed":
        await safely("case message", case.id, refresh_case_message(ctx, case))
        was = fmt_money(out.previous.credit_cents) if out.previous else "?"
        await safely("thread", case.id, post_thread(ctx, case, (
            f":arrows_counterclockwise: The billing evidence changed since this case was opened, so nothing was "
            f"approved. Checked again: {fmt_money(case.credit_cents)} (was {was}), needs level "
            f"{ctx.config.level_label(case.required_level)}. Decide again on the updated message.")))
        await ephemeral(ctx, channel, user, f"{out.reason} Case #{case.id} now proposes {fmt_money(case.credit_cents)}.")
        return
    await safely("case message", case.id, refresh_case_message(ctx, case))
    if done_text:
        await safely("thread", case.id, post_thread(ctx, case, done_text))


async def upload_csv(client, channel_id: str, thread_ts: str | None, filename: str, content: str,
                     title: str) -> str | None:
    """Share a CSV into a channel (and thread) with Slack's external upload: files.getUploadURLExternal,
    a POST of the bytes to the URL it gave, files.completeUploadExternal (slack_sdk's files_upload_v2).
    The file id, or None with one logged line when Slack refuses or cannot be reached: the message the
    file goes with is still useful without it, so nothing is raised to the caller."""
    try:
        r = await client.files_upload_v2(channel=channel_id, thread_ts=thread_ts, filename=filename,
                                         content=content.encode("utf-8"), title=title)
        f = r.get("file") or {}
        if not f.get("id"):
            log.warning("csv %s not shared in %s: Slack answered without a file id", filename, channel_id)
            return None
        return f["id"]
    except SlackApiError as exc:
        log.warning("csv %s not shared in %s: %s", filename, channel_id, exc.response.get("error"))
    except Exception as exc:  # the upload POST refused (SlackRequestError), no connection, a timeout
        log.warning("csv %s not shared in %s: %s", filename, channel_id,
                    " ".join(str(exc).split())[:200] or type(exc).__name__)
    return None


def who(user: str) -> str:
    return f"<@{user}>"


__all__ = ["ephemeral", "button_ids", "refresh_case_message", "post_thread", "post_evidence", "permalink",
           "ping_level", "report_systematic", "safely", "show_outcome", "escape", "who", "upload_csv"]
