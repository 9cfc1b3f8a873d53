"""The morning message: one summary in the alerts channel, grouped by kind, worst cases first, each
with an "Open case" button that starts the /billing-check flow for that instance. Customers on the
watchlist (/billing-watch) come first: every anomaly of theirs, however small. A finding kind seen
for at least systematic_min_customers customers gets a "Remediate all" button (SPEC 5.3)."""
from __future__ import annotations

import logging

from slack_sdk.web.async_client import AsyncWebClient

from bot.blocks import enforce_limits, remediate_button
from handlers.timeline import fmt_money
from services.config import Config, ConfigError, Env
from services.reconcile import FINDING_KIND, KIND_ORDER

log = logging.getLogger(__name__)
WORST_PER_KIND = 3
WATCHED_MAX = 20  # the watchlist's lines; Block Kit allows 50 blocks in all


def _anomaly_block(a, rec, instance_for: dict[tuple, str], label: str = "") -> dict:
    instance = a.instance_id or instance_for.get((a.kind, a.org_id))
    who = a.instance_id or f"org {a.org_id}"
    block = {"type": "section", "text": {"type": "mrkdwn", "text":
             f"• {label}{who} ({a.customer_id}): {fmt_money(a.overcharge_cents)} — {a.detail}"}}
    if instance:
        block["accessory"] = {"type": "button", "action_id": "open_case", "text": {"type": "plain_text",
                              "text": "Open case"}, "value": f"{instance} {rec.day.strftime('%Y-%m')}"}
    return block


def remediation_offers(rec, min_customers: int | None) -> list[tuple[str, int]]:
    """(finding kind, customers) for each finding kind the day saw, with an overcharge, for at least
    `min_customers` customers: the systematic rule's own count (Reconciliation.customers_by_finding_kind,
    which is what reconcile_kind_customers stores), so the reconciliation kinds of one finding kind
    (duplicate and overlap, billed_after_stop and billed_while_idle) count their customers together
    and give one button. Kinds without a finding kind (charge_mismatch, usage_mismatch) give none."""
    if not min_customers:
        return []
    seen = rec.customers_by_finding_kind()
    order = [fk for k in KIND_ORDER if (fk := FINDING_KIND.get(k))]
    return [(fk, len(seen[fk])) for fk in dict.fromkeys(order) if fk in seen and len(seen[fk]) >= min_customers]


def reconciliation_blocks(rec, instance_for: dict[tuple, str], watched: frozenset[str] | set[str] = frozenset(),
                          min_customers: int | None = None) -> dict:
    """min_customers: config.systematic_min_customers; a finding kind that reached it gets a
    "Remediate all" button (SPEC 5.3) in the last block, which enforce_limits always keeps."""
    totals = rec.totals()
    money = sum(t["overcharge_cents"] for t in totals.values())
    blocks = [{"type": "header", "text": {"type": "plain_text", "text": f"Billing reconciliation {rec.day.isoformat()}"}},
              {"type": "section", "text": {"type": "mrkdwn", "text":
               f"*{len(rec.anomalies)} anomalies*, {fmt_money(money)} estimated overcharge" if rec.anomalies
               else "No anomalies: every billed hour of the day checks out."}}]
    # the watchlist first, whatever the amounts: these customers are watched because something
    # already went wrong for them (a zero-cent charge_mismatch included)
    mine = sorted((a for a in rec.anomalies if a.customer_id in watched),
                  key=lambda a: (a.customer_id, -a.overcharge_cents, a.kind))
    if mine:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text":
                       f"*Watchlist*: {len(mine)} anomal{'y' if len(mine) == 1 else 'ies'} of "
                       f"{len({a.customer_id for a in mine})} watched customer(s)"}})
        blocks += [_anomaly_block(a, rec, instance_for, f"{a.kind}: ") for a in mine[:WATCHED_MAX]]
        if len(mine) > WATCHED_MAX:
            blocks.append({"type": "section", "text": {"type": "mrkdwn", "text":
                           f"…and {len(mine) - WATCHED_MAX} more of watched customers"}})
    for kind, t in totals.items():
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text":
                       f"*{kind}*: {t['count']} · {fmt_money(t['overcharge_cents'])}"}})
        # the worst of the others: the watched customers' are listed above already
        worst = [a for a in rec.anomalies if a.kind == kind and a.customer_id not in watched][:WORST_PER_KIND]
        blocks += [_anomaly_block(a, rec, instance_for) for a in worst]
    offers = remediation_offers(rec, min_customers)
    if offers:
        period = rec.day.strftime("%Y-%m")
        blocks.append({"type": "actions", "block_id": "remediate_plans", "elements": [
            remediate_button(fk, period, f"Remediate all {fk} ({n} customers)") for fk, n in offers]})
    return enforce_limits({"text": f"Billing reconciliation {rec.day.isoformat()}: {len(rec.anomalies)} anomalies",
                           "blocks": blocks})


async def post_reconciliation(env: Env, config: Config, rec, db=None) -> None:
    channel = config.channels.get("alerts")
    if not channel or not env.slack_bot_token:
        raise ConfigError("channels.alerts and SLACK_BOT_TOKEN are needed to --post")
    instance_for = await _busiest_instances(db, rec) if db is not None else {}
    watched = await _watched(db) if db is not None else frozenset()
    from bot.app import slack_client
    client: AsyncWebClient = slack_client(env)
    msg = reconciliation_blocks(rec, instance_for, watched, config.systematic_min_customers)
    await client.chat_postMessage(channel=channel, text=msg["text"], blocks=msg["blocks"])


async def _watched(db) -> frozenset[str]:
    """The watchlist; a failure to read it must not stop the morning message (logged)."""
    from services.store import Watchlist
    try:
        return frozenset(r["customer_id"] for r in await Watchlist(db).list())
    except Exception:
        log.exception("watchlist not read: the morning message goes out without it first")
        return frozenset()


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
