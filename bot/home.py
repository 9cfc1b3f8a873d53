"""App Home: my open cases, and cases waiting for my approval."""
from __future__ import annotations

from bot.blocks import home_view
from bot.context import ctx_of
from handlers.cases import may_approve
from services.approvals import MembershipUnknown


async def home_opened(event, client, context) -> None:
    ctx = ctx_of(context)

    async def publish():
        user = event["user"]
        mine = await ctx.cases.store.open_cases_by(user)
        try:
            authority = await ctx.cases.authority(user)
            waiting = [c for c in await ctx.cases.store.pending() if may_approve(c, authority, ctx.config).allowed]
        except MembershipUnknown:
            waiting = []
        await client.views_publish(user_id=user, view=home_view(mine, waiting))
    ctx.spawn(publish(), "app home")


def register(app) -> None:
    app.event("app_home_opened")(home_opened)
