"""The Bolt app and its HTTP server (`billing-bot serve`).

HTTP mode: aiohttp on PORT, Slack posts to /slack/events (signatures verified by Bolt), plus the
probes and GET /metrics. Socket Mode when SLACK_APP_TOKEN is set (the same listeners; the probes
and /metrics are still served on PORT).

Probes: GET /livez (and /healthz, kept for old probes) says the process and its event loop are
alive, without touching the database, so a database blip never makes Kubernetes restart the bot
(which then keeps answering Slack with "database unavailable"). GET /readyz pings the database
and fails while it is down or while the bot is shutting down.

Lifecycle: start (runtime, migrations, Slack client, background loops, HTTP), then wait for
SIGTERM/SIGINT; then stop taking work (readiness fails, the listener closes), give in-flight
background work DRAIN_S to finish and cancel the rest (a case cut mid-issuing stays approved or
issuing in the database and the issuing sweeper of any replica resumes it), close the pools and
the clients; the CLI then stops an embedded PostgreSQL. Exit 0 well within Kubernetes' grace period.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.async_app import AsyncApp
from slack_sdk.web.async_client import AsyncWebClient

from bot import home, remediation_flow, scheduler
from bot.actions import adjust, approve, batch, open_case, reject, retry
from bot.commands import billing_check, billing_remediate, billing_report, billing_watch
from bot.context import BotContext
from bot.issuing_notifier import SlackNotifier
from bot.runtime import open_runtime
from bot.views import check_modal
from services.approvals import GROUP_CACHE_S, STALE_LIMIT_S, GroupMembers, authority_of, holders
from services.background import Background
from services.cases import CaseService
from services.config import Config, ConfigError, Env
from services.db import Database
from services.issuing import Issuer
from services.remediation import RemediationService
from services.store import Batches, CaseStore, Watchlist

log = logging.getLogger(__name__)
LISTENERS = (billing_check, billing_remediate, billing_report, billing_watch, check_modal, approve, adjust, reject, retry,
             open_case, batch, home)


class _DropTokenSkippedWarning(logging.Filter):
    """Bolt reads SLACK_BOT_TOKEN from the environment even when given a client, then warns on every
    start that the token is unused. The client (pointed at SLACK_API_URL) is what we mean to use:
    that one warning, matched exactly, is dropped; every other Bolt message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        from slack_bolt.logger.messages import warning_client_prioritized_and_token_skipped

        return record.getMessage() != warning_client_prioritized_and_token_skipped()


_TOKEN_SKIPPED = _DropTokenSkippedWarning()


def build_app(ctx: BotContext) -> AsyncApp:
    logging.getLogger("slack_bolt.AsyncApp").addFilter(_TOKEN_SKIPPED)  # added once, however many apps
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
    ctx = BotContext(env=env, config=config, client=client, groups=groups, cases=service,
                     remediation=RemediationService(service, Batches(rt.db), Watchlist(rt.db)))
    if rt.polar is not None:
        async def customer(external_id: str) -> dict:
            c = await rt.polar.customer_by_external_id(external_id)
            return {"name": c.name, "email": c.email}
        # Refund outcomes arrive by webhook; without a secret, or past 10 minutes, they are read back.
        # env.issuing_workers (BILLING_BOT_ISSUING_WORKERS): the runtime sized the workers' pool to it
        service.issuer = Issuer(service, rt.polar, config, SlackNotifier(ctx, customer), workers=env.issuing_workers,
                                poll_pending_after_s=float(os.environ.get("BILLING_BOT_POLL_PENDING_S", 600))
                                if env.polar_webhook_secret else 0.0)
    return ctx


DRAIN_S = float(os.environ.get("BILLING_BOT_DRAIN_S", "10"))  # in-flight work's time to finish after SIGTERM
HTTP_SHUTDOWN_S = 3.0  # open HTTP requests (Slack acks take milliseconds) after the listener closes
READY_DB_TIMEOUT_S = 2.0


@dataclass
class ServeState:
    """What the probes report and the shutdown drains."""

    demo: bool = False
    draining: bool = False
    db: Database | None = None  # what /readyz pings
    # the long-lived loops (reminders, the issuing sweeper): cancelled, not awaited, at shutdown
    loops: Background = field(default_factory=lambda: Background(name="bot loop"))


def web_app(ctx: BotContext, app: AsyncApp, state: ServeState | None = None) -> web.Application:
    state = state or ServeState()

    async def events(request: web.Request) -> web.Response:
        return await to_aiohttp_response(await app.async_dispatch(await to_bolt_request(request)))

    async def livez(_request: web.Request) -> web.Response:
        # Answering at all proves the event loop runs; the database is readiness's business.
        return web.json_response({"ok": True})

    async def readyz(_request: web.Request) -> web.Response:
        body: dict = {"ok": True, "database": "ok"}
        if state.demo:
            body["demo_database"] = True
        if state.draining:
            return web.json_response({**body, "ok": False, "draining": True}, status=503)
        try:
            async with state.db.pool.connection(timeout=READY_DB_TIMEOUT_S) as conn:
                await conn.execute("SELECT 1")
        except Exception as exc:
            return web.json_response({**body, "ok": False, "database": f"unavailable: {type(exc).__name__}"},
                                     status=503)
        return web.json_response(body)

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(ctx.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    w = web.Application()
    w.router.add_post("/slack/events", events)
    w.router.add_post("/polar/webhooks", polar_webhooks(ctx))
    w.router.add_get("/livez", livez)
    w.router.add_get("/healthz", livez)
    w.router.add_get("/readyz", readyz)
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


DEMO_LABEL = "DEMO DATABASE: made-up data, not Orzbob Cloud's billing (no DATABASE_URL)."
_LABELLED = ("chat.postMessage", "chat.postEphemeral", "chat.update")
_MAX_MESSAGE_BLOCKS = 50  # Slack's limit: a full message is left as it is (its text still says it)


class DemoLabelledClient(AsyncWebClient):
    """`serve --demo`: every message the bot posts says first that it comes from the demo database
    (SPEC 5: "says so in every output"), without each listener having to know."""

    async def api_call(self, api_method: str, *, json: dict | None = None, **kw):
        if api_method in _LABELLED and json is not None:
            json = dict(json)
            if json.get("text"):
                json["text"] = f"{DEMO_LABEL}\n{json['text']}"
            blocks = json.get("blocks")
            if isinstance(blocks, list) and len(blocks) < _MAX_MESSAGE_BLOCKS:
                label = {"type": "context", "elements": [{"type": "mrkdwn", "text": f":warning: *{DEMO_LABEL}*"}]}
                json["blocks"] = [label, *blocks]
        return await super().api_call(api_method, json=json, **kw)


def slack_client(env: Env, demo: bool = False) -> AsyncWebClient:
    from slack_sdk.http_retry.builtin_async_handlers import (AsyncConnectionErrorRetryHandler,
                                                             AsyncRateLimitErrorRetryHandler,
                                                             AsyncServerErrorRetryHandler)
    base = env.slack_api_url if env.slack_api_url.endswith("/") else env.slack_api_url + "/"
    # Slack's own blips (429 with Retry-After, 5xx, dropped connections) are retried by the client;
    # what still fails is logged with its case and never undoes a decision (bot/slack_io.py).
    cls = DemoLabelledClient if demo else AsyncWebClient
    return cls(token=env.slack_bot_token, base_url=base, retry_handlers=[
        AsyncConnectionErrorRetryHandler(max_retry_count=2), AsyncRateLimitErrorRetryHandler(max_retry_count=2),
        AsyncServerErrorRetryHandler(max_retry_count=2)])


def _start_background(ctx: BotContext, state: ServeState) -> None:
    tick = float(os.environ.get("BILLING_BOT_REMINDER_TICK_S", "30"))
    state.loops.spawn(scheduler.run_forever(ctx, tick), "reminders")
    issuer = ctx.cases.issuer
    if issuer is not None:  # every replica sweeps what a crash, a shutdown or an outage left unfinished
        sweep_every = float(os.environ.get("BILLING_BOT_SWEEP_S", "30"))
        sweep_age = float(os.environ.get("BILLING_BOT_SWEEP_AGE_S", "60"))
        state.loops.spawn(issuer.run_sweeper(sweep_every, sweep_age), "issuing sweeper")
    if ctx.remediation is not None:  # every replica: resume batches, keep their progress messages current
        batch_tick = float(os.environ.get("BILLING_BOT_BATCH_TICK_S", "2"))
        state.loops.spawn(remediation_flow.run_forever(ctx, batch_tick), "remediation progress")


def _stop_event() -> asyncio.Event:
    """Set on SIGTERM (Kubernetes) or SIGINT (Ctrl-C)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _work(ctx: BotContext) -> list[Background]:
    """What holds in-flight work: the listeners' case jobs and the issuing workers."""
    issuer = ctx.cases.issuer
    return [ctx.background] + ([issuer.background] if issuer is not None and issuer.background else [])


async def _drain(ctx: BotContext, state: ServeState, budget_s: float) -> None:
    """Let in-flight work finish within budget_s, then cancel what is left. A cancelled issuing
    leaves its case approved or issuing, with its outbox intent written: the sweeper (of any
    replica) resumes it, and the read-back of Polar's refunds keeps it exactly once."""
    state.loops.cancel()  # loops never finish on their own; a tick cut short is claimed again later
    await state.loops.drain(2)
    work = _work(ctx)
    running = sum(b.running for b in work)
    if running:
        log.info("shutdown: waiting up to %.1f s for %d background task(s)", budget_s, running)
        deadline = time.monotonic() + budget_s
        for b in work:
            await b.drain(max(0.0, deadline - time.monotonic()))
    left = sum(b.running for b in work)
    if left:
        log.warning("shutdown: cancelling %d unfinished background task(s); the issuing sweeper resumes "
                    "any case left approved or issuing", left)
        for b in work:
            b.cancel()
        for b in work:
            await b.drain(2)


async def _serve(env: Env, config: Config, demo: bool = False) -> None:
    if not env.slack_bot_token or not (env.slack_signing_secret or env.slack_app_token):
        raise ConfigError("SLACK_BOT_TOKEN and SLACK_SIGNING_SECRET (or SLACK_APP_TOKEN) are needed to serve")
    stop = _stop_event()
    state = ServeState(demo=demo)
    async with open_runtime(env, config) as rt:  # on leaving: the pools and the clients are closed
        await CaseStore(rt.db).migrate()
        ctx = build_context(env, config, rt, slack_client(env, demo=demo))
        state.db = rt.db
        app = build_app(ctx)
        _start_background(ctx, state)
        runner = web.AppRunner(web_app(ctx, app, state), access_log=None, shutdown_timeout=HTTP_SHUTDOWN_S)
        await runner.setup()
        await web.TCPSite(runner, "0.0.0.0", env.port).start()
        socket_mode = None
        if env.slack_app_token:
            from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
            socket_mode = AsyncSocketModeHandler(app, env.slack_app_token)
            await socket_mode.connect_async()
        log.info("billing-bot listening on :%s (%s)%s", env.port, "Socket Mode" if socket_mode else "HTTP",
                 " on the DEMO DATABASE" if demo else "")

        await stop.wait()

        t0 = time.monotonic()
        log.info("shutdown: SIGTERM received, no new work is taken")
        state.draining = True  # readiness fails at once
        if socket_mode is not None:
            await socket_mode.close_async()
        await runner.cleanup()  # stop listening; open requests get HTTP_SHUTDOWN_S
        await _drain(ctx, state, DRAIN_S)
    log.info("shutdown: done in %.1f s (database pools closed)", time.monotonic() - t0)


def serve(env: Env, config: Config, demo: bool = False) -> int:
    """Run until SIGTERM; 0 on a clean stop. Logging is set up by the CLI (services/logs.py)."""
    asyncio.run(_serve(env, config, demo=demo))
    return 0
