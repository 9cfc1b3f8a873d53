"""/billing-watch add|remove|list <customer> [reason]: the watchlist (the runbook's manual
monitoring list), whose customers' anomalies the morning reconciliation lists first.

Answered privately in the ack: one small indexed statement, well within Slack's 3 seconds."""
from __future__ import annotations

from bot.blocks import escape
from bot.context import ctx_of
from services.inputs import InputError, validate_customer_id
from services.store import Watchlist

USAGE = "usage: /billing-watch add <customer-id> [reason] · /billing-watch remove <customer-id> · /billing-watch list"
REASON_MAX = 300
LIST_MAX = 50


def parse_watch_text(text: str) -> tuple[str, str | None, str | None]:
    """(action, customer, reason); InputError naming what is wrong."""
    parts = (text or "").strip().split(None, 2)
    if not parts or parts[0].lower() not in ("add", "remove", "list"):
        raise InputError(USAGE)
    action = parts[0].lower()
    if action == "list":
        if len(parts) > 1:
            raise InputError("list takes no customer id: " + USAGE)
        return action, None, None
    if len(parts) < 2:
        raise InputError(f"{action}: the customer id is missing; " + USAGE)
    customer = validate_customer_id(parts[1])
    reason = parts[2].strip() if len(parts) > 2 else None
    if action == "remove" and reason:
        raise InputError("remove takes only the customer id")
    if reason and len(reason) > REASON_MAX:
        raise InputError(f"the reason is longer than {REASON_MAX} characters")
    return action, customer, reason or None


async def billing_watch(ack, command, client, context) -> None:
    ctx = ctx_of(context)
    ctx.metrics.commands.labels("billing-watch").inc()
    try:
        action, customer, reason = parse_watch_text(command.get("text") or "")
    except InputError as exc:  # nothing is read or written
        await ack(response_type="ephemeral", text=f":warning: {escape(exc)}")
        return
    watchlist = Watchlist(ctx.cases.store.db)
    if action == "add":
        added = await watchlist.add(customer, reason, command["user_id"])
        text = (f":eyes: {escape(customer)} is now on the watchlist" + (f": {escape(reason)}" if reason else "")
                + ". Its anomalies come first in the morning reconciliation." if added
                else f"{escape(customer)} is already on the watchlist.")
    elif action == "remove":
        removed = await watchlist.remove(customer)
        text = (f"{escape(customer)} is off the watchlist." if removed else f"{escape(customer)} was not on the watchlist.")
    else:
        rows = await watchlist.list()
        if not rows:
            text = "The watchlist is empty."
        else:
            lines = [f"• {escape(r['customer_id'])} — since {r['added_at']:%Y-%m-%d}, by {escape(r['added_by'] or '?')}"
                     + (f": {escape(r['reason'])}" if r["reason"] else "") for r in rows[:LIST_MAX]]
            more = [f"…and {len(rows) - LIST_MAX} more"] if len(rows) > LIST_MAX else []
            text = f"*Watchlist* ({len(rows)}):\n" + "\n".join(lines + more)
    await ack(response_type="ephemeral", text=text)


def register(app) -> None:
    app.command("/billing-watch")(billing_watch)
