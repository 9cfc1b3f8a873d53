"""The morning message: one summary in the alerts channel, grouped by kind, worst cases first, each
with an "Open case" button that starts the /billing-check flow for that instance."""
from __future__ import annotations

import logging

from slack_sdk.web.async_client import AsyncWebClient

from bot.blocks import enforce_limits
from handlers.timeline import fmt_money
from services.config import Config, ConfigError, Env

log = logging.getLogger(__name__)
WORST_PER_KIND = 3


def reconciliation_blocks(rec, instance_for: dict[tuple, str]) -> dict:
    totals = rec.totals()
    money = sum(t["overcharge_cents"] for t in totals.values())
    blocks = [{"type": "header", "text": {"type": "plain_text", "text": f"Billing reconciliation {rec.day.isoformat()}"}},
              {"type": "section", "text": {"type": "mrkdwn", "text":
               f"*{len(rec.anomalies)} anomalies*, {fmt_money(money)} estimated overcharge" if rec.anomalies
               else "No anomalies: every billed hour of the day checks out."}}]
    for kind, t in totals.items():
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text":
                       f"*{kind}*: {t['count']} · {fmt_money(t['overcharge_cents'])}"}})
        worst = [a for a in rec.anomalies if a.kind == kind][:WORST_PER_KIND]
        for a in worst:
            instance = a.instance_id or instance_for.get((a.kind, a.org_id))
            who = a.instance_id or f"org {a.org_id}"
            block = {"type": "section", "text": {"type": "mrkdwn", "text":
                     f"• {who} ({a.customer_id}): {fmt_money(a.overcharge_cents)} — {a.detail}"}}
            if instance:
                block["accessory"] = {"type": "button", "action_id": "open_case", "text": {"type": "plain_text",
                                      "text": "Open case"}, "value": f"{instance} {rec.day.strftime('%Y-%m')}"}
            blocks.append(block)
    return enforce_limits({"text": f"Billing reconciliation {rec.day.isoformat()}: {len(rec.anomalies)} anomalies",
                           "blocks": blocks})


async def post_reconciliation(env: Env, config: Config, rec, db=None) -> None:
    channel = config.channels.get("alerts")
    if not channel or not env.slack_bot_token:
        raise ConfigError("channels.alerts and SLACK_BOT_TOKEN are needed to --post")
    instance_for = await _busiest_instances(db, rec) if db is not None else {}
    from bot.app import slack_client
    client: AsyncWebClient = slack_client(env)
    msg = reconciliation_blocks(rec, instance_for)
    await client.chat_postMessage(channel=channel, text=msg["text"], blocks=msg["blocks"])


async def _busiest_instances(db, rec) -> dict[tuple, str]:
    """For org-level anomalies (daily_limit), the org instance with the most flagged records."""
    wanted = {(a.kind, a.org_id): a.record_ids for a in rec.anomalies if a.instance_id is None and a.record_ids}
    out = {}
    async with db.snapshot() as conn:
        for key, ids in wanted.items():
            cur = await conn.execute("SELECT instance_id, count(*) AS n FROM billing_records WHERE id = ANY(%s)"
                                     " GROUP BY instance_id ORDER BY n DESC, instance_id LIMIT 1", (ids,))
            row = await cur.fetchone()
            if row:
                out[key] = row["instance_id"]
    return out
