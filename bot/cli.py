"""`billing-bot`: check, serve, reconcile, report, demo.

Exit codes: 0 done; 2 bad input or configuration (one line on stderr naming the problem);
1 a required system (the database) could not be used (one line on stderr naming it).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys

from services.config import Config, ConfigError, Env, load_config
from services.inputs import InputError, validate_instance_id, validate_period

log = logging.getLogger("billing_bot")

ENVIRONMENT_HELP = """\
environment (SPEC 5; secrets only ever come from here and are never printed):
  DATABASE_URL          postgresql://user:password@host:5432/dbname, the control-plane database.
                        Not set: the embedded demo database (made-up data, last month), and every
                        output starts with a "DEMO DATABASE" line (on stderr for --json and --csv,
                        so the output stays parseable; for serve --demo in the log and in every
                        Slack message)
  BILLING_BOT_DATA      the demo database's folder (default ./.billing-bot/pgdata)
  BILLING_BOT_CONFIG    the YAML file of levels, channels, rate card and limits (SPEC 5.1)
  BILLING_BOT_SCHEMA    the bot's own schema (default billing_bot)
  KUBECONFIG            the cluster to read (else the in-cluster service account, else none)
  POLAR_API_URL, POLAR_API_KEY      Polar (no key: Polar is reported as not configured)
  SLACK_BOT_TOKEN, SLACK_SIGNING_SECRET, SLACK_APP_TOKEN (Socket Mode), SLACK_API_URL
  SMTP_URL              customer emails (else drafts are posted in the case thread)
  PORT                  serve's HTTP port (default 3000)
  LOG_FORMAT            json: one JSON object per log line (default: text lines with UTC timestamps)"""

EXIT_HELP = """\
exit codes:
  0  done (a report was printed, or serve stopped on SIGTERM)
  1  the database could not be used; one line on stderr names what failed (within about 5 s)
  2  bad input or configuration (an invalid id or period, a bad DATABASE_URL or config key, or
     serve / reconcile --post without DATABASE_URL and without --demo); one line on stderr"""

EPILOG = ENVIRONMENT_HELP + "\n\n" + EXIT_HELP


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="billing-bot", description="Investigate and correct Orzbob Cloud billing.",
                                epilog=EPILOG, formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="investigate an instance and print the case", epilog=EPILOG, formatter_class=fmt,
                       description="Investigate an instance's billed hours and print the case (SPEC 2).")
    c.add_argument("instance_id", help="the instance id; or 'customer' / 'org' followed by its id: every instance "
                   "of the customer or org billed in the periods")
    c.add_argument("scope_id", nargs="?", metavar="ID", help="after 'customer' or 'org': the customer or org id")
    c.add_argument("--period", action="append",
                   help="billing period YYYY-MM (repeatable; default: the current and the previous month, "
                        "which hold the demo month on the demo database)")
    c.add_argument("--json", action="store_true", help="print the case as JSON (SPEC 5)")
    s = sub.add_parser("serve", help="run the Slack bot", epilog=EPILOG, formatter_class=fmt,
                       description="Run the Slack bot: HTTP on PORT (/slack/events, /livez, /healthz, /readyz, "
                                   "/metrics), or Socket Mode with SLACK_APP_TOKEN. Logs at INFO on stderr. "
                                   "SIGTERM stops it cleanly (exit 0).")
    s.add_argument("--demo", action="store_true",
                   help="serve Slack from the embedded demo database on purpose (without DATABASE_URL)")
    r = sub.add_parser("reconcile", help="run the daily reconciliation", epilog=EPILOG, formatter_class=fmt,
                       description="Reconcile one UTC day's billing records (SPEC 5.2).")
    r.add_argument("--date", help="UTC day YYYY-MM-DD (default: yesterday)")
    r.add_argument("--json", action="store_true")
    r.add_argument("--post", action="store_true", help="post the summary to the alerts channel (sharded: once, "
                   "by the shard that completes the day)")
    r.add_argument("--demo", action="store_true",
                   help="allow --post from the embedded demo database (without DATABASE_URL)")
    r.add_argument("--shard", metavar="K/N", help="reconcile only the orgs of shard K of N (by a hash of org_id);"
                   " the shards' results are merged in the database")
    r.add_argument("--run", metavar="KEY", help="names a sharded run, so its shards find each other"
                   " (default: the day and N; the Indexed Job passes its uid)")
    rp = sub.add_parser("report", help="credits issued since a day, or the month's usage by customer", epilog=EPILOG,
                        formatter_class=fmt)
    rp.add_argument("--since", help="YYYY-MM-DD: credits issued since that day")
    rp.add_argument("--csv", action="store_true")
    rp.add_argument("--usage", action="store_true", help="the top customers by billed charges and hours in --month")
    rp.add_argument("--month", help="YYYY-MM (with --usage)")
    rp.add_argument("--json", action="store_true", help="with --usage: print the report as JSON")
    rm = sub.add_parser("remediate", help="plan the remediation of one finding kind over a period (SPEC 5.3)",
                        epilog=EPILOG, formatter_class=fmt,
                        description="Check every instance billed in the period and add up, per customer, the "
                                    "findings of one kind. With --dry-run only print it (read-only). Without, "
                                    "store the plan as a batch and post it to the escalation channel, where one "
                                    "approval by the level covering its total issues it (needs DATABASE_URL, "
                                    "SLACK_BOT_TOKEN and channels.escalation).")
    rm.add_argument("--kind", required=True, help="duplicate_charge, stuck_instance, throttle_continuous, "
                    "throttle_daily or wrong_tier")
    rm.add_argument("--period", required=True, help="billing period YYYY-MM")
    rm.add_argument("--dry-run", action="store_true", help="only print (and with --csv write) the plan")
    rm.add_argument("--csv", metavar="FILE", help="write the plan as CSV: customer_id,instance_ids,hours,credit_cents")
    rm.add_argument("--json", action="store_true", help="print the plan as JSON (SPEC 5.3)")
    rm.add_argument("--demo", action="store_true",
                    help="allow posting a plan from the embedded demo database (without DATABASE_URL)")
    w = sub.add_parser("watch", help="the watchlist: add, remove or list customers", epilog=EPILOG, formatter_class=fmt)
    w.add_argument("action", choices=("add", "remove", "list"))
    w.add_argument("customer_id", nargs="?")
    w.add_argument("reason", nargs="*", help="why (add only)")
    sub.add_parser("demo", help="print the cases of the demo instances (embedded database)", epilog=EPILOG,
                   formatter_class=fmt)
    return p


def _machine_output(args) -> bool:
    # remediate --csv names a file: its stdout is only machine output with --json
    csv = getattr(args, "csv", False) if args.command != "remediate" else False
    return bool(getattr(args, "json", False) or csv)


SCOPES = ("customer", "org")


def _validate_args(args) -> None:
    """Every id, period and combination checked before anything is read (exit 2, one line)."""
    from services.inputs import validate_customer_id, validate_day, validate_kind, validate_month, validate_org_id

    if args.command == "check":
        if args.instance_id in SCOPES:
            if not args.scope_id:
                raise InputError(f"check {args.instance_id}: the {args.instance_id} id is missing "
                                 f"(billing-bot check {args.instance_id} <id>)")
            (validate_customer_id if args.instance_id == "customer" else validate_org_id)(args.scope_id)
        else:
            validate_instance_id(args.instance_id)
            if args.scope_id is not None:
                raise InputError(f"check: unexpected argument {args.scope_id[:80]!r} after the instance id "
                                 "(use --period YYYY-MM for a period)")
        for p in args.period or []:
            validate_period(p)
    elif args.command == "remediate":
        validate_kind(args.kind)
        validate_period(args.period)
    elif args.command == "report":
        if args.usage:
            if not args.month:
                raise InputError("report --usage: --month YYYY-MM is needed")
            validate_month(args.month)
            if args.since or args.csv:
                raise InputError("report --usage takes --month (and --json), not --since or --csv")
        else:
            if not args.since:
                raise InputError("report: --since YYYY-MM-DD is needed (or --usage --month YYYY-MM)")
            validate_day(args.since)
            if args.month or args.json:
                raise InputError("report: --month and --json go with --usage")
    elif args.command == "watch":
        if args.action == "list":
            if args.customer_id is not None:
                raise InputError("watch list takes no customer id")
        else:
            if not args.customer_id:
                raise InputError(f"watch {args.action}: the customer id is missing")
            validate_customer_id(args.customer_id)
            if args.action == "remove" and args.reason:
                raise InputError("watch remove takes only the customer id")


def demo_banner() -> str:
    from services.demo_data import demo_month
    from services.embedded import data_folder

    return (f"DEMO DATABASE: DATABASE_URL is not set, so this runs on the embedded demo database "
            f"({data_folder()}), made-up data for {demo_month():%Y-%m}; set DATABASE_URL for real data.")


def _refuse_demo(args) -> None:
    """serve with Slack and reconcile --post act on people; on made-up data only when asked to."""
    if args.command == "serve" and not args.demo:
        raise ConfigError("serve: DATABASE_URL is not set; refusing to answer Slack from the embedded demo "
                          "database (pass --demo to do that on purpose)")
    if args.command == "remediate" and not args.dry_run and not args.demo:
        raise ConfigError("remediate: DATABASE_URL is not set; refusing to post a plan that would credit customers "
                          "from the embedded demo database (use --dry-run for the plan alone, or --demo on purpose)")
    if args.command == "reconcile" and args.post and not args.demo:
        raise ConfigError("reconcile --post: DATABASE_URL is not set; refusing to post the demo database's "
                          "reconciliation to the alerts channel (pass --demo to do that on purpose)")


def _sigterm_exits(_signum, _frame) -> None:
    # A one-shot command stopped by SIGTERM unwinds like Ctrl-C, so `finally` stops the embedded database.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    from services.embedded import stop_embedded
    from services.logs import QUIET_FOR_COMMANDS, setup_logging

    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "serve":  # the log is serve's output: INFO, timestamped (JSON with LOG_FORMAT=json)
        setup_logging(logging.INFO)
    else:  # a one-shot command's output is its report; only real problems reach stderr
        setup_logging(logging.WARNING, quiet=QUIET_FOR_COMMANDS)
        signal.signal(signal.SIGTERM, _sigterm_exits)
    env = None
    try:
        env = Env.from_environ()
        config = load_config()
        _validate_args(args)
        if env.database_url:
            from services.db import validate_database_url

            validate_database_url(env.database_url)
        else:
            _refuse_demo(args)
            if args.command == "serve":
                log.warning("%s", demo_banner())
            else:
                print(demo_banner(), file=sys.stderr if _machine_output(args) else sys.stdout, flush=True)
        if args.command == "check" and args.instance_id in SCOPES:
            return asyncio.run(_check_many(env, config, args))
        if args.command == "check":
            return asyncio.run(_check(env, config, args))
        if args.command == "remediate":
            return asyncio.run(run_remediate_cli(env, config, args))
        if args.command == "watch":
            return asyncio.run(run_watch_cli(env, config, args))
        if args.command == "demo":
            from bot.demo import run_demo
            return asyncio.run(run_demo(env, config))
        if args.command == "serve":
            from bot.app import serve
            return serve(env, config, demo=not env.database_url)
        if args.command == "reconcile":
            return asyncio.run(run_reconcile_cli(env, config, args))
        if args.command == "report":
            return asyncio.run(run_report_cli(env, config, args))
    except (InputError, ConfigError) as exc:
        print(f"billing-bot: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a system we need is down: say which, briefly, without secrets
        print(f"billing-bot: {describe_fatal(exc, env)}", file=sys.stderr)
        return 1
    finally:
        stop_embedded()
    return 0


def describe_fatal(exc: BaseException, env: Env | None = None) -> str:
    """One line naming what failed. Never a password: the URL is shown redacted, and libpq's
    messages (which never quote the password) are cut to their first line."""
    import psycopg
    import psycopg_pool

    from services.db import redact_url

    where = "the embedded demo database"
    if env is not None and env.database_url:
        where = f"the database at {redact_url(env.database_url)} (DATABASE_URL)"
    first = (str(exc).strip().splitlines() or [""])[0].strip()
    if env is not None and env.database_url:
        first = redact_url(first)
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return "a database query ran past its statement timeout: " + first
    if isinstance(exc, psycopg.errors.UndefinedTable):
        return f"the control-plane database lacks a table the bot reads: {first}"
    if isinstance(exc, psycopg.OperationalError):
        return f"cannot connect to {where}: {first or type(exc).__name__}"
    if isinstance(exc, psycopg_pool.PoolTimeout):
        return f"no connection to {where} within the pool's timeout ({first or 'PoolTimeout'})"
    from slack_sdk.errors import SlackApiError
    if isinstance(exc, SlackApiError):
        return f"Slack refused {exc.response.api_url.rsplit('/', 1)[-1]}: {exc.response.get('error')}"
    return f"{type(exc).__name__}: {first}"


async def _check(env: Env, config: Config, args) -> int:
    from bot.runtime import open_runtime
    from templates import render

    async with open_runtime(env, config) as rt:
        report = await rt.investigator.check(args.instance_id, args.period)
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print(render("report.txt.j2", report=report, level_text=config.level_label(report.result.required_level)),
              end="")
    return 0


async def _check_many(env: Env, config: Config, args) -> int:
    """check customer <id> (one result) / check org <id> (one result per customer, a JSON list)."""
    from bot.runtime import open_runtime
    from services.multi_check import check_customer, check_org
    from templates import render

    async with open_runtime(env, config) as rt:
        if args.instance_id == "customer":
            results = [await check_customer(rt.investigator, args.scope_id, args.period)]
        else:
            results = await check_org(rt.investigator, args.scope_id, args.period)
    if args.json:
        out = results[0].as_json() if args.instance_id == "customer" else [r.as_json() for r in results]
        print(json.dumps(out, indent=2))
    else:
        print("\n".join(render("check_multi.txt.j2", multi=r) for r in results), end="")
    return 0


async def run_remediate_cli(env: Env, config: Config, args) -> int:
    """The plan of SPEC 5.3. --dry-run: printed (and written with --csv), nothing stored. Otherwise
    the plan is stored as a batch and posted to the escalation channel with its CSV, where one
    approval by the level covering the total issues it: the approval is a person's, in Slack."""
    import getpass

    from bot.runtime import open_runtime
    from templates import render

    channel = config.channels.get("escalation")
    if not args.dry_run and not (env.slack_bot_token and channel):
        print("billing-bot: remediate: a plan is approved in Slack, so posting it needs SLACK_BOT_TOKEN and "
              "channels.escalation in the configuration; nothing was stored (use --dry-run for the plan alone)",
              file=sys.stderr)
        return 2
    async with open_runtime(env, config) as rt:
        if args.dry_run:
            from services.remediation import plan_remediation
            plan, batch = await plan_remediation(rt.investigator, args.kind, args.period), None
        else:
            from bot.app import build_context, slack_client
            from bot.remediation_flow import post_plan
            from services.store import CaseStore
            await CaseStore(rt.db).migrate()
            ctx = build_context(env, config, rt, slack_client(env))
            user = f"cli:{getpass.getuser()}"
            batch, plan = await ctx.remediation.propose(args.kind, args.period, user, channel)
            if plan.customers:
                batch = await post_plan(ctx, batch, plan, channel, user)
    level = config.required_level(plan.total_cents)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            f.write(plan.as_csv())
    if args.json:
        print(json.dumps(plan.as_json(level), indent=2))
    else:
        print(render("remediation_plan.txt.j2", plan=plan, level_text=config.level_label(level),
                     csv_file=args.csv, dry_run=args.dry_run), end="")
    if batch is not None:
        where = f"posted to {channel} for approval" if plan.customers else \
            "not posted: it credits nobody"
        print(f"batch-{batch['id']} stored, {where}", file=sys.stderr)
    return 0


async def run_watch_cli(env: Env, config: Config, args) -> int:
    from services.db import Database
    from services.embedded import database_url
    from services.store import Watchlist
    import getpass

    url, _embedded = database_url(env)
    db = await Database.connect(url, config.bot_schema)
    try:
        wl = Watchlist(db)
        if args.action == "add":
            reason = " ".join(args.reason).strip() or None
            added = await wl.add(args.customer_id, reason, f"cli:{getpass.getuser()}")
            print(f"{args.customer_id} {'added to' if added else 'is already on'} the watchlist")
        elif args.action == "remove":
            removed = await wl.remove(args.customer_id)
            print(f"{args.customer_id} {'removed from the watchlist' if removed else 'was not on the watchlist'}")
        else:
            rows = await wl.list()
            for r in rows:
                print(f"{r['customer_id']}\t{r['added_at']:%Y-%m-%d}\t{r['added_by'] or ''}\t{r['reason'] or ''}")
            if not rows:
                print("the watchlist is empty")
    finally:
        await db.close()
    return 0


async def run_reconcile_cli(env, config: Config, args) -> int:
    from services.embedded import database_url
    from bot.reconcile_post import post_reconciliation
    from services.db import Database
    from services.reconcile_shards import claim_post, merge_if_complete, release_post, save_shard
    from services.reconcile import add_books_check, parse_day, parse_shard, reconcile_day, render_text, write_json
    from services.store import Store

    day = parse_day(args.date)
    shard = parse_shard(getattr(args, "shard", None))
    url, _embedded = database_url(env)
    db = await Database.connect(url, config.bot_schema)
    polar = _polar_client(env, config)
    try:
        async with db.snapshot() as conn:
            rec = await reconcile_day(conn, day, config, shard)
        to_post = None
        if shard[1] == 1:
            if polar is not None:
                await add_books_check(rec, db, polar, config.polar.usage_event_name)
            try:  # feeds the systematic rule; a read-only database must not stop the report
                await Store(db).record_reconciliation(rec)
            except Exception as exc:
                print(f"billing-bot: warning: reconciliation not recorded for the systematic rule: "
                      f"{type(exc).__name__}", file=sys.stderr)
            to_post = rec if args.post else None
        else:
            # a shard's part is only useful merged: it must be stored, so a failure here fails the shard
            run_key = getattr(args, "run", None) or f"{day.isoformat()}/{shard[1]}"
            await save_shard(db, run_key, shard, rec)
            merged = await merge_if_complete(db, run_key, day, shard[1])
            if merged is not None and args.post and await claim_post(db, run_key):
                if polar is not None:  # the books are the whole day's: checked once, by the shard that posts
                    await add_books_check(merged, db, polar, config.polar.usage_event_name)
                to_post = merged
        if to_post is not None:
            try:
                await post_reconciliation(env, config, to_post, db)
            except BaseException:
                if shard[1] > 1:  # hand the post back, so the Job's retry of this shard can post it
                    await release_post(db, run_key)
                raise
    finally:
        await db.close()
        if polar is not None:
            await polar.close()
    if args.json:
        write_json(rec, sys.stdout)
    else:
        print(render_text(rec))
    return 0


def _polar_client(env: Env, config: Config):
    """Polar for the books check, when configured (the reconciliation itself needs only the database)."""
    if not (env.polar_api_key or env.polar_api_url_set):
        return None
    from services.polar import PolarClient
    return PolarClient(env.polar_api_url, env.polar_api_key, api_version=config.polar.api_version)


async def run_report_cli(env, config, args) -> int:
    from services.credits_report import credits_report
    from services.embedded import database_url
    from services.inputs import validate_day
    from services.db import Database

    from services.store import CaseStore

    url, _embedded = database_url(env)
    if args.usage:
        from services.usage_report import usage_report
        db = await Database.connect(url, config.bot_schema)
        try:
            usage = await usage_report(db, args.month)
        finally:
            await db.close()
        print(json.dumps(usage.as_json(), indent=2) if args.json else usage.as_text())
        return 0
    since = validate_day(args.since)
    db = await Database.connect(url, config.bot_schema)
    try:
        report = await credits_report(CaseStore(db), since)
    finally:
        await db.close()
    print(report.as_csv() if args.csv else report.as_text(), end="" if args.csv else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
