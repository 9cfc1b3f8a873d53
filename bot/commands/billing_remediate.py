"""/billing-remediate <kind> <YYYY-MM>: ack at once, then compute the plan and post it (SPEC 5.3).
Bad input is answered privately in the ack, naming the valid kinds; nothing is read or stored."""
from __future__ import annotations

from bot import remediation_flow
from bot.blocks import escape
from bot.context import ctx_of
from services.inputs import InputError


async def billing_remediate(ack, command, context) -> None:
    ctx = ctx_of(context)
    ctx.metrics.commands.labels("billing-remediate").inc()
    try:
        kind, period = remediation_flow.parse_remediate_text(command.get("text") or "")
    except InputError as exc:
        await ack(response_type="ephemeral", text=f":warning: {escape(exc)}")
        return
    await ack(response_type="ephemeral",
              text=f":hourglass: Computing the remediation plan for {kind} {period}: every instance billed in "
                   f"{period} is checked. The plan is posted here.")
    ctx.spawn(remediation_flow.propose(ctx, kind=kind, period=period, user=command["user_id"],
                                       channel=command["channel_id"], response_url=command.get("response_url")),
              f"remediation plan {kind} {period}")


def register(app) -> None:
    app.command("/billing-remediate")(billing_remediate)
