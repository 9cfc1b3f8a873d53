"""App Home: my open cases, and cases waiting for my approval."""
from __future__ import annotations

from bot.context import BotContext
from handlers.timeline import fmt_money
from services.approvals import authority_of


def _line(case: dict) -> dict:
    text = (f"*#{case['id']}* {case['instance_id']} · {fmt_money(case['credit_cents'])} · {case['state']}"
            f" · needs level {case['required_level']}")
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def home_view(mine: list[dict], waiting: list[dict]) -> dict:
    blocks = [{"type": "header", "text": {"type": "plain_text", "text": "My open cases"}}]
    blocks += [_line(c) for c in mine[:20]] or [{"type": "context", "elements": [
        {"type": "mrkdwn", "text": "None. Start one with `/billing-check <instance-id>`."}]}]
    blocks.append({"type": "header", "text": {"type": "plain_text", "text": "Waiting for my approval"}})
    blocks += [_line(c) for c in waiting[:20]] or [{"type": "context", "elements": [
        {"type": "mrkdwn", "text": "Nothing is waiting for you."}]}]
    return {"type": "home", "blocks": blocks[:100]}


def register(app, ctx: BotContext) -> None:
    @app.event("app_home_opened")
    async def opened(event, client):
        user = event["user"]
        mine = await ctx.cases.open_cases_by(user)
        authority = await authority_of(ctx.config, ctx.groups, user)
        waiting = [c for c in await ctx.cases.pending() if authority.covers(c["credit_cents"])
                   and not (ctx.config.four_eyes and c["requested_by"] == user)]
        await client.views_publish(user_id=user, view=home_view(mine, waiting))
