"""A remediation batch's buttons (SPEC 5.3): "Remediate all" (value "<kind> <YYYY-MM>") computes
and posts a plan; Approve (value: the batch id) is one decision by a level covering the total;
Reject asks why in a modal. The service decides; bot/remediation_flow.py shows."""
from __future__ import annotations

from bot import remediation_flow, slack_io
from bot.blocks import batch_reject_modal, escape
from bot.context import ctx_of
from services.inputs import InputError

CALLBACK = "batch_reject_modal"


def _ids(body: dict) -> tuple[str, str | None, str]:
    return body["user"]["id"], (body.get("channel") or {}).get("id"), body["actions"][0]["value"]


async def remediate_plan(ack, body, context) -> None:
    await ack()
    ctx = ctx_of(context)
    user, channel, value = _ids(body)
    try:
        kind, period = remediation_flow.parse_remediate_text(value)
    except InputError as exc:
        ctx.spawn(slack_io.ephemeral(ctx, channel, user, f":warning: {escape(exc)}"))
        return
    ctx.spawn(remediation_flow.propose(ctx, kind=kind, period=period, user=user, channel=channel or user),
              f"remediation plan {kind} {period}")


async def approve_batch(ack, body, context) -> None:
    await ack()
    ctx = ctx_of(context)
    user, channel, value = _ids(body)
    batch_id = int(value)
    ctx.spawn(remediation_flow.approve(ctx, batch_id, user, channel), f"approval of batch-{batch_id}")


async def open_reject(ack, body, client, context) -> None:
    """Opened at once, while Slack's trigger is valid (3 s)."""
    await ack()
    ctx = ctx_of(context)
    user, channel, value = _ids(body)
    batch = await ctx.remediation.batches.get(int(value))
    if batch is None or batch["state"] != "planned":
        what = "No such batch." if batch is None else f"batch-{batch['id']} is {batch['state']}: nothing to reject."
        ctx.spawn(slack_io.ephemeral(ctx, channel, user, what))
        return
    await client.views_open(trigger_id=body["trigger_id"], view=batch_reject_modal(batch))


async def submit_reject(ack, body, view, context) -> None:
    ctx = ctx_of(context)
    batch_id = int(view["private_metadata"])
    user = body["user"]["id"]
    reason = (view["state"]["values"]["reason"]["value"]["value"] or "").strip()
    out = await ctx.remediation.reject(batch_id, user, reason)
    if not out.ok:
        why = out.reason
        if out.needed_level:
            why += f". Level {ctx.config.level_label(out.needed_level)} can decide this plan"
        await ack(response_action="errors", errors={"reason": why[:2000]})
        return
    await ack()
    ctx.metrics.decisions.labels("batch_rejected").inc()
    ctx.spawn(remediation_flow.reject_done(ctx, out.batch, user, reason), f"rejection of batch-{batch_id}")


def register(app) -> None:
    app.action("remediate_plan")(remediate_plan)
    app.action("batch_approve")(approve_batch)
    app.action("batch_reject")(open_reject)
    app.view(CALLBACK)(submit_reject)
