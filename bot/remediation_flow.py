"""Remediating a systematic defect from Slack (SPEC 5.3): the plan message with its CSV, the one
approval, and the batch's one progress message, kept current by a loop in every replica.

The service (services/remediation.py) decides; this module only shows. Slack failing never undoes a
decision: the progress message is claimed in the database before it is posted (one replica posts
each change) and released when Slack refused it, so the next tick posts it again.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone

from slack_sdk.errors import SlackApiError

from bot import slack_io
from bot.blocks import batch_name, escape, mention_text, plan_message, progress_message
from bot.cases_flow import post_or_dm, respond
from bot.context import BotContext
from bot.scheduler import every
from handlers.cases import may_remediate
from handlers.model import KINDS
from handlers.remediation import Plan, plan_from_json
from handlers.timeline import fmt_money
from services.approvals import holders
from services.inputs import InputError, validate_kind, validate_period

log = logging.getLogger(__name__)
USAGE = f"usage: /billing-remediate <kind> <YYYY-MM>, kind one of {', '.join(KINDS)}"


def parse_remediate_text(text: str, today=None) -> tuple[str, str]:
    """'<kind> <YYYY-MM>' -> (kind, period). Raises InputError naming what is wrong (and the kinds)."""
    parts = (text or "").split()
    if len(parts) != 2:
        raise InputError(USAGE)
    try:
        kind = validate_kind(parts[0])
    except InputError as exc:
        raise InputError(f"{exc}. {USAGE}") from None
    period = validate_period(parts[1])
    today = today or datetime.now(timezone.utc).date()
    if period > f"{today.year:04d}-{today.month:02d}":
        raise InputError(f"{period} is in the future: nothing has been billed in it yet")
    return kind, period


async def propose(ctx: BotContext, *, kind: str, period: str, user: str, channel: str,
                  response_url: str | None = None) -> dict | None:
    """Compute the plan, store it as a batch, post it. Any failure is told to the requester."""
    try:
        batch, plan = await ctx.remediation.propose(kind, period, user, channel)
    except InputError as exc:
        await _tell(ctx, channel, user, response_url, f":warning: {escape(exc)}")
        return None
    except Exception as exc:
        log.exception("remediation plan for %s %s failed", kind, period)
        await _tell(ctx, channel, user, response_url,
                    f":x: Could not compute the remediation plan for {kind} {period}: {type(exc).__name__}. "
                    "Try again shortly.")
        return None
    try:
        return await post_plan(ctx, batch, plan, channel, user, response_url)
    except Exception as exc:  # Slack down or refusing: the requester hears of it, nothing was decided
        log.exception("batch-%s: posting the plan failed", batch["id"])
        await slack_io.safely("plan failure", None, _tell(ctx, channel, user, response_url, (
            f":x: The plan {batch_name(batch['id'])} ({kind} {period}) was computed but could not be posted: "
            f"{type(exc).__name__}. Nothing was approved or issued; run `/billing-remediate {kind} {period}` again.")))
        return None


async def _tell(ctx, channel, user, response_url, text) -> None:
    if not await respond(response_url, text):
        await slack_io.ephemeral(ctx, channel, user, text)


async def post_plan(ctx: BotContext, batch: dict, plan: Plan, channel: str, user: str,
                    response_url: str | None = None) -> dict:
    """The plan message in the channel (or, where the bot cannot post, in the requester's DMs),
    its CSV in its thread, and engineering told (Level 3 is informed of any systematic defect)."""
    msg = plan_message(batch, plan, ctx.config)
    posted = await post_or_dm(ctx, channel, user, response_url, batch_name(batch["id"]), "plans",
                              text=msg["text"], blocks=msg["blocks"])
    channel, ts = posted["channel"], posted["ts"]
    await ctx.remediation.batches.set_message(batch["id"], channel, ts)
    if plan.customers:
        name = batch_name(batch["id"])
        await slack_io.upload_csv(ctx.client, channel, ts, f"{name}-{plan.kind}-{plan.period}.csv", plan.as_csv(),
                                  f"{name}: {plan.kind} {plan.period}, {len(plan.customers)} customers")
        await slack_io.safely("engineering", None, _tell_engineering(ctx, batch, plan, channel, ts))
        posted_batch = {**batch, "channel_id": channel, "message_ts": ts}
        if not await _requester_decides(ctx, user, plan.total_cents):  # as for a case (SPEC 3): the level is pinged
            h = await holders(ctx.config, ctx.groups, batch["required_level"])
            await slack_io.safely("ping", None, _ping_level(ctx, posted_batch, h, None))
    return {**batch, "channel_id": channel, "message_ts": ts}


async def _requester_decides(ctx: BotContext, user: str, cents: int) -> bool:
    """Whether the requester can approve the plan themself (the plan's own policy, four-eyes included)."""
    try:
        return may_remediate(cents, user, await ctx.cases.authority(user), ctx.config).allowed
    except Exception:  # unknown (Slack groups unreadable): the level is pinged, the safe side
        return False


async def _plan_link(ctx: BotContext, batch_id: int, channel: str, ts: str) -> str:
    """A link to the plan message, or its name when Slack will not give one."""
    try:
        return (await ctx.client.chat_getPermalink(channel=channel, message_ts=ts))["permalink"]
    except (SlackApiError, KeyError, TypeError):
        return batch_name(batch_id)


async def _tell_engineering(ctx: BotContext, batch: dict, plan: Plan, channel: str, ts: str) -> None:
    eng = ctx.config.channels.get("engineering")
    if not eng:
        return
    link = await _plan_link(ctx, batch["id"], channel, ts)
    await ctx.client.chat_postMessage(channel=eng, text=(
        f":rotating_light: Systematic billing defect: remediation plan {batch_name(batch['id'])} for {plan.kind} "
        f"{plan.period}: {len(plan.customers)} customers, {plan.instance_count} instances, "
        f"{fmt_money(plan.total_cents)} (needs level {ctx.config.level_label(batch['required_level'])} to approve). "
        f"{link}"))


async def _ping_level(ctx: BotContext, batch: dict, h: dict, user: str | None) -> None:
    """As for a case (slack_io.ping_level): the level's groups and users in the escalation channel.
    user: who tried to approve and was refused; None when the plan was just posted by someone who
    cannot approve it."""
    channel = ctx.config.channels.get("escalation")
    if not channel:
        return
    link = await _plan_link(ctx, batch["id"], batch["channel_id"], batch["message_ts"])
    await ctx.client.chat_postMessage(channel=channel, text=(
        f"{mention_text(h)}: remediation plan {batch_name(batch['id'])} ({batch['kind']} {batch['period']}) needs "
        f"level {h['level']} ({h['name']}) to approve {fmt_money(batch['total_cents'])}. "
        + (f"<@{user}> tried to approve it and was refused. " if user else "")
        + link))


def _plan_of(batch: dict) -> Plan:
    return plan_from_json(batch["plan"])


async def _update_plan(ctx: BotContext, batch: dict, status: str) -> None:
    if not batch.get("channel_id") or not batch.get("message_ts"):
        return
    msg = plan_message(batch, _plan_of(batch), ctx.config, status=status)
    await ctx.client.chat_update(channel=batch["channel_id"], ts=batch["message_ts"], text=msg["text"],
                                 blocks=msg["blocks"])


async def approve(ctx: BotContext, batch_id: int, user: str, channel: str | None):
    out = await ctx.remediation.approve(batch_id, user)
    if out.status == "missing":
        await slack_io.ephemeral(ctx, channel, user, out.reason)
    elif out.status == "refused":
        ctx.metrics.refusals.inc()
        text = f":no_entry: {out.reason}"
        if out.needed_level:
            h = await holders(ctx.config, ctx.groups, out.needed_level)
            text += (f". {fmt_money(out.batch['total_cents'])} needs level {h['level']} ({h['name']}): "
                     f"{mention_text(h)}. They have been pinged.")
            await slack_io.safely("ping", None, _ping_level(ctx, out.batch, h, user))
        await slack_io.ephemeral(ctx, channel, user, text)
    elif out.status == "changed":
        old = await ctx.remediation.batches.get(batch_id)
        await slack_io.safely("plan message", None, _update_plan(ctx, old, (
            f":arrows_counterclockwise: Replaced by {batch_name(out.batch['id'])}: the billing data changed since this "
            "plan was made, so nothing was approved. Decide the new plan below.")))
        where = (old or {}).get("channel_id") or channel or user
        await slack_io.ephemeral(ctx, channel, user, out.reason)
        await post_plan(ctx, out.batch, out.plan, where, out.batch["requested_by"])
    else:
        ctx.metrics.decisions.labels("batch_approved").inc()
        batch = out.batch  # the approved row, as the approval's UPDATE returned it
        await slack_io.safely("plan message", None, _update_plan(ctx, batch, (
            f":white_check_mark: Approved by <@{user}>: {len(out.plan.customers)} customers, "
            f"{fmt_money(out.plan.total_cents)}; each customer's case is issued in Polar. Progress in the thread.")))
        await update_progress(ctx, batch_id)
    return out


async def reject_done(ctx: BotContext, batch: dict, user: str, reason: str) -> None:
    await _update_plan(ctx, batch, f":no_entry: Rejected by <@{user}>: {escape(reason)}")


# --- the progress message ----------------------------------------------------------------------------

async def update_progress(ctx: BotContext, batch_id: int) -> bool:
    """Post or update the batch's one progress message if what it says changed. The batch's
    session lock keeps two replicas (or the approval and the loop) from posting it twice, and the
    database claim makes each change posted once. True when Slack was told something new."""
    batches = ctx.remediation.batches
    async with batches.locked(batch_id, "progress") as mine:
        if not mine:  # another replica (or the approval) is posting it: next tick
            return False
        batch = await batches.get(batch_id)
        if batch is None or batch["state"] != "approved" or not batch["channel_id"]:
            return False
        progress = await ctx.remediation.progress(batch_id)
        msg = progress_message(batch, progress)
        if not await batches.claim_progress(batch_id, msg["text"], progress.settled):
            return False
        try:
            if batch["progress_ts"]:
                await ctx.client.chat_update(channel=batch["channel_id"], ts=batch["progress_ts"], text=msg["text"],
                                             blocks=msg["blocks"])
            else:
                posted = await ctx.client.chat_postMessage(channel=batch["channel_id"], thread_ts=batch["message_ts"],
                                                           text=msg["text"], blocks=msg["blocks"])
                await batches.set_progress_ts(batch_id, posted["ts"])
        except Exception:
            await batches.release_progress(batch_id)
            raise
        return True


async def progress_once(ctx: BotContext) -> int:
    """One tick: open what a crash left unopened, then bring every unfinished batch's message up to date."""
    told = 0
    try:
        await ctx.remediation.resume()
    except Exception:
        log.exception("resuming remediation batches failed")
    for batch in await ctx.remediation.batches.unfinished():
        try:
            told += await update_progress(ctx, batch["id"])
        except Exception:
            log.exception("%s: the progress message could not be updated; the next tick tries again",
                          batch_name(batch["id"]))
    return told


async def run_forever(ctx: BotContext, tick_s: float) -> None:
    await every(tick_s, lambda: progress_once(ctx), "remediation progress tick")
