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
from services.approvals import GROUP_CACHE_S, STALE_LIMIT_S, GroupMembers, authority_of, holders
from services.background import Background
from services.cases import CaseService
from services.config import Config, ConfigError, Env
from services.issuing import Issuer
from services.store import CaseStore

log = logging.getLogger(__name__)
LISTENERS = (billing_check, billing_report, check_modal, approve, adjust, reject, retry, open_case, home)


def build_app(ctx: BotContext) -> AsyncApp:
    app = AsyncApp(client=ctx.client, signing_secret=ctx.env.slack_signing_secret,
                   process_before_response=True)

    @app.middleware
    async def with_context(context, next):  # listeners read the bot's context as context["bot"]
        context["bot"] = ctx
        await next()

    for module in LISTENERS:
        module.register(app)
    return app


def build_context(env: Env, config: Config, rt, client: AsyncWebClient) -> BotContext:
    """The composition root: the store, the case service, the issuer and the listeners' context."""
    store = CaseStore(rt.db)

    async def group_users(group_id: str) -> list[str]:
        r = await client.usergroups_users_list(usergroup=group_id)
        return list(r.get("users") or [])
    # The cache and the 5-minute outage limit of SPEC 3; the environment can shorten them (tests).
    groups = GroupMembers(group_users, ttl_s=float(os.environ.get("BILLING_BOT_GROUP_CACHE_S", GROUP_CACHE_S)),
                          stale_limit_s=min(float(os.environ.get("BILLING_BOT_GROUP_STALE_S", STALE_LIMIT_S)),
                                            STALE_LIMIT_S))
    service = CaseService(store, rt.investigator, config, lambda user: authority_of(config, groups, user),
                          lambda level: holders(config, groups, level))
    ctx = BotContext(env=env, config=config, client=client, groups=groups, cases=service)
    if rt.polar is not None:
        async def customer(external_id: str) -> dict:
            c = await rt.polar.customer_by_external_id(external_id)
            return {"name": c.name, "email": c.email}
        # Refund outcomes arrive by webhook; without a secret, or past 10 minutes, they are read back.
        service.issuer = Issuer(service, rt.polar, config, SlackNotifier(ctx, customer),
                                poll_pending_after_s=float(os.environ.get("BILLING_BOT_POLL_PENDING_S", 600))
                                if env.polar_webhook_secret else 0.0)
    return ctx


def web_app(ctx: BotContext, app: AsyncApp) -> web.Application:
    async def events(request: web.Request) -> web.Response:
        return await to_aiohttp_response(await app.async_dispatch(await to_bolt_request(request)))

    async def healthz(_request: web.Request) -> web.Response:
        try:
            async with ctx.cases.store.db.pool.connection(timeout=2) as conn:
                await conn.execute("SELECT 1")
        except Exception as exc:
            return web.json_response({"ok": False, "database": type(exc).__name__}, status=503)
        return web.json_response({"ok": True})

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(ctx.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    w = web.Application()
    w.router.add_post("/slack/events", events)
    w.router.add_post("/polar/webhooks", polar_webhooks(ctx))
    w.router.add_get("/healthz", healthz)
    w.router.add_get("/metrics", metrics)
    return w


def polar_webhooks(ctx: BotContext):
    """POST /polar/webhooks: Polar's refund outcomes (SPEC 4), verified with POLAR_WEBHOOK_SECRET."""
    from services.polar_webhooks import make_handler
    from services.store import WebhookDeliveries

    deliveries = WebhookDeliveries(ctx.cases.store.db)
    issuer = ctx.cases.issuer

    async def on_event(event, webhook_id: str) -> None:
        if issuer is not None:
            await issuer.on_polar_event(event, webhook_id)
    return make_handler(ctx.env.polar_webhook_secret, on_event, deliveries.first_time, deliveries.forget)


def slack_client(env: Env) -> AsyncWebClient:
    from slack_sdk.http_retry.builtin_async_handlers import (AsyncConnectionErrorRetryHandler,
                                                             AsyncRateLimitErrorRetryHandler,
                                                             AsyncServerErrorRetryHandler)
    base = env.slack_api_url if env.slack_api_url.endswith("/") else env.slack_api_url + "/"
    # Slack's own blips (429 with Retry-After, 5xx, dropped connections) are retried by the client;
    # what still fails is logged with its case and never undoes a decision (bot/slack_io.py).
    return AsyncWebClient(token=env.slack_bot_token, base_url=base, retry_handlers=[
        AsyncConnectionErrorRetryHandler(max_retry_count=2), AsyncRateLimitErrorRetryHandler(max_retry_count=2),
        AsyncServerErrorRetryHandler(max_retry_count=2)])


async def _serve(env: Env, config: Config) -> None:
    if not env.slack_bot_token or not (env.slack_signing_secret or env.slack_app_token):
        raise ConfigError("SLACK_BOT_TOKEN and SLACK_SIGNING_SECRET (or SLACK_APP_TOKEN) are needed to serve")
    async with open_runtime(env, config) as rt:
        await CaseStore(rt.db).migrate()
        client = slack_client(env)
        ctx = build_context(env, config, rt, client)
        app = build_app(ctx)
        tick = float(os.environ.get("BILLING_BOT_REMINDER_TICK_S", "30"))
        loops = Background(name="bot loop")
        loops.spawn(scheduler.run_forever(ctx, tick), "reminders")
        issuer = ctx.cases.issuer
        if issuer is not None:  # every replica sweeps what a crash or an outage left unfinished
            sweep_every = float(os.environ.get("BILLING_BOT_SWEEP_S", "30"))
            sweep_age = float(os.environ.get("BILLING_BOT_SWEEP_AGE_S", "60"))
            loops.spawn(issuer.run_sweeper(sweep_every, sweep_age), "issuing sweeper")
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
            loops.cancel()
            await runner.cleanup()


def serve(env: Env, config: Config) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_serve(env, config))
    except KeyboardInterrupt:
        pass
    return 0
