"""The Bolt app and its HTTP server (`billing-bot serve`).

HTTP mode: aiohttp on PORT, Slack posts to /slack/events (signatures verified by Bolt), plus
GET /healthz and GET /metrics. Socket Mode when SLACK_APP_TOKEN is set (the same listeners).
"""
from __future__ import annotations

import asyncio
import logging
import os

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.async_app import AsyncApp
from slack_sdk.web.async_client import AsyncWebClient

from bot import home, scheduler
from bot.actions import adjust, approve, open_case, reject, retry
from bot.commands import billing_check, billing_report
from bot.context import BotContext
from bot.issuing_notifier import SlackNotifier
from bot.runtime import open_runtime
from bot.views import check_modal
from services.approvals import GroupMembers
from services.config import Config, ConfigError, Env
from services.issuing import Issuer
from services.store import CaseStore

log = logging.getLogger(__name__)
LISTENERS = (billing_check, billing_report, check_modal, approve, adjust, reject, retry, open_case, home)


def build_app(ctx: BotContext) -> AsyncApp:
    app = AsyncApp(client=ctx.client, signing_secret=ctx.env.slack_signing_secret,
                   process_before_response=True)
    for module in LISTENERS:
        module.register(app, ctx)
    return app


def web_app(ctx: BotContext, app: AsyncApp) -> web.Application:
    async def events(request: web.Request) -> web.Response:
        return await to_aiohttp_response(await app.async_dispatch(await to_bolt_request(request)))

    async def healthz(_request: web.Request) -> web.Response:
        try:
            async with ctx.db.pool.connection(timeout=2) as conn:
                await conn.execute("SELECT 1")
        except Exception as exc:
            return web.json_response({"ok": False, "database": type(exc).__name__}, status=503)
        return web.json_response({"ok": True})

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(ctx.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    w = web.Application()
    w.router.add_post("/slack/events", events)
    w.router.add_get("/healthz", healthz)
    w.router.add_get("/metrics", metrics)
    return w


def slack_client(env: Env) -> AsyncWebClient:
    base = env.slack_api_url if env.slack_api_url.endswith("/") else env.slack_api_url + "/"
    return AsyncWebClient(token=env.slack_bot_token, base_url=base)


async def _serve(env: Env, config: Config) -> None:
    if not env.slack_bot_token or not (env.slack_signing_secret or env.slack_app_token):
        raise ConfigError("SLACK_BOT_TOKEN and SLACK_SIGNING_SECRET (or SLACK_APP_TOKEN) are needed to serve")
    async with open_runtime(env, config) as rt:
        cases = CaseStore(rt.db)
        await cases.migrate()
        client = slack_client(env)

        async def group_users(group_id: str) -> list[str]:
            r = await client.usergroups_users_list(usergroup=group_id)
            return list(r.get("users") or [])

        ctx = BotContext(env=env, config=config, db=rt.db, cases=cases, investigator=rt.investigator,
                         client=client, groups=GroupMembers(group_users))
        if rt.polar is not None:
            async def customer(external_id: str) -> dict:
                c = await rt.polar.customer_by_external_id(external_id)
                return {"name": c.name, "email": c.email}
            ctx.issuer = Issuer(cases, rt.polar, config, SlackNotifier(ctx, customer))
        app = build_app(ctx)
        tick = float(os.environ.get("BILLING_BOT_REMINDER_TICK_S", "30"))
        reminders = asyncio.create_task(scheduler.run_forever(ctx, tick))
        if ctx.issuer is not None:  # a restart resumes whatever was left approved or issuing
            asyncio.create_task(ctx.issuer.resume_unfinished())
        runner = web.AppRunner(web_app(ctx, app))
        await runner.setup()
        await web.TCPSite(runner, "0.0.0.0", env.port).start()
        log.warning("billing-bot listening on :%s (%s)", env.port, "Socket Mode" if env.slack_app_token else "HTTP")
        try:
            if env.slack_app_token:
                from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
                await AsyncSocketModeHandler(app, env.slack_app_token).start_async()
            else:
                await asyncio.Event().wait()
        finally:
            reminders.cancel()
            await runner.cleanup()


def serve(env: Env, config: Config) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_serve(env, config))
    except KeyboardInterrupt:
        pass
    return 0
