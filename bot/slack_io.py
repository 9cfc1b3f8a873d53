"""Small helpers over the Slack Web API used by several listeners."""
from __future__ import annotations

import logging

from slack_sdk.errors import SlackApiError

from bot.blocks import case_message, evidence_messages
from bot.context import BotContext
from handlers.timeline import fmt_money
from services.approvals import everyone, holders, mention_text

log = logging.getLogger(__name__)


async def ephemeral(ctx: BotContext, channel: str | None, user: str, text: str) -> None:
    try:
        if channel:
            await ctx.client.chat_postEphemeral(channel=channel, user=user, text=text)
        else:
            await ctx.client.chat_postMessage(channel=user, text=text)
    except SlackApiError as exc:
        log.warning("could not tell %s: %s", user, exc.response.get("error"))


def button_ids(body: dict) -> tuple[str, str | None, int]:
    """(user, channel, case id) from a block_actions payload whose button carries the case id."""
    return body["user"]["id"], (body.get("channel") or {}).get("id"), int(body["actions"][0]["value"])


async def open_modal_for_pending(ctx: BotContext, body: dict, build_view, refusal) -> None:
    """Open a decision modal, unless the case has left pending meanwhile (then say why)."""
    user, channel, case_id = button_ids(body)
    case = await ctx.cases.get(case_id)
    if case is None or case["state"] != "pending":
        await ephemeral(ctx, channel, user, refusal(case))
        return
    await ctx.client.views_open(trigger_id=body["trigger_id"], view=build_view(case))


async def refresh_case_message(ctx: BotContext, case: dict) -> None:
    if not case.get("channel_id") or not case.get("message_ts"):
        return
    msg = case_message(case, ctx.config)
    await ctx.client.chat_update(channel=case["channel_id"], ts=case["message_ts"], text=msg["text"],
                                 blocks=msg["blocks"])


async def post_thread(ctx: BotContext, case: dict, text: str) -> None:
    if case.get("channel_id") and case.get("message_ts"):
        await ctx.client.chat_postMessage(channel=case["channel_id"], thread_ts=case["message_ts"], text=text)


async def post_evidence(ctx: BotContext, case: dict) -> None:
    for text in evidence_messages(case["report"]):
        await post_thread(ctx, case, text)


async def permalink(ctx: BotContext, case: dict) -> str:
    try:
        r = await ctx.client.chat_getPermalink(channel=case["channel_id"], message_ts=case["message_ts"])
        return r["permalink"]
    except (SlackApiError, KeyError, TypeError):
        return f"case #{case['id']}"


async def ping_level(ctx: BotContext, case: dict, why: str) -> list[str]:
    """Mention the needed level's groups in the escalation channel and DM each of its members."""
    h = await holders(ctx.config, ctx.groups, case["required_level"])
    link = await permalink(ctx, case)
    amount = fmt_money(case["credit_cents"])
    text = (f"{mention_text(h)}: billing case #{case['id']} for {case['instance_id']} needs "
            f"level {h['level']} ({h['name']}) to approve {amount}. {why} {link}")
    channel = ctx.config.channels.get("escalation")
    if channel:
        await ctx.client.chat_postMessage(channel=channel, text=text)
    members = everyone(h)
    for user in members:
        try:
            await ctx.client.chat_postMessage(channel=user, text=f"Billing case #{case['id']} is waiting for your "
                                              f"approval: {amount} for {case['instance_id']}. {link}")
        except SlackApiError as exc:
            log.warning("could not DM %s: %s", user, exc.response.get("error"))
    return members


async def report_systematic(ctx: BotContext, case: dict) -> None:
    channel = ctx.config.channels.get("engineering")
    if not channel:
        return
    r = case["report"]
    reasons = "\n".join(f"• {x}" for x in r.get("systematic_reasons", []))
    kinds = ", ".join(f["kind"] for f in r["findings"])
    link = await permalink(ctx, case)
    await ctx.client.chat_postMessage(channel=channel, text=(
        f":rotating_light: Systematic billing defect (case #{case['id']}, {case['instance_id']}, org {case['org_id']})\n"
        f"Kinds: {kinds}; credit {fmt_money(case['credit_cents'])}.\n{reasons}\n{link}"))
