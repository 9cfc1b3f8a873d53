"""`billing-bot`: check, serve, reconcile, report, demo.

Exit codes: 0 done; 2 bad input or configuration (one line on stderr naming the problem);
1 a required system (the database) could not be used.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from services.config import Config, ConfigError, Env, load_config
from services.inputs import InputError, validate_instance_id, validate_period

log = logging.getLogger("billing_bot")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="billing-bot", description="Investigate and correct Orzbob Cloud billing.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="investigate an instance and print the case")
    c.add_argument("instance_id")
    c.add_argument("--period", action="append", help="billing period YYYY-MM (repeatable; default: current and previous)")
    c.add_argument("--json", action="store_true", help="print the case as JSON (SPEC 5)")
    sub.add_parser("serve", help="run the Slack bot")
    r = sub.add_parser("reconcile", help="run the daily reconciliation")
    r.add_argument("--date", help="UTC day YYYY-MM-DD (default: yesterday)")
    r.add_argument("--json", action="store_true")
    r.add_argument("--post", action="store_true", help="post the summary to the alerts channel (sharded: once, "
                   "by the shard that completes the day)")
    r.add_argument("--shard", metavar="K/N", help="reconcile only the orgs of shard K of N (by a hash of org_id);"
                   " the shards' results are merged in the database")
    r.add_argument("--run", metavar="KEY", help="names a sharded run, so its shards find each other"
                   " (default: the day and N; the Indexed Job passes its uid)")
    rp = sub.add_parser("report", help="credits issued since a day")
    rp.add_argument("--since", required=True, help="YYYY-MM-DD")
    rp.add_argument("--csv", action="store_true")
    sub.add_parser("demo", help="print the cases of the demo instances (embedded database)")
    return p




def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        env = Env.from_environ()
        config = load_config()
        if args.command == "check":
            validate_instance_id(args.instance_id)
            for p in args.period or []:
                validate_period(p)
            return asyncio.run(_check(env, config, args))
        if args.command == "demo":
            from bot.demo import run_demo
            return asyncio.run(run_demo(env, config))
        if args.command == "serve":
            from bot.app import serve
            return serve(env, config)
        if args.command == "reconcile":
            from services.reconcile import run_reconcile_cli
            return asyncio.run(run_reconcile_cli(env, config, args))
        if args.command == "report":
            from services.credits_report import run_report_cli
            return asyncio.run(run_report_cli(env, config, args))
    except (InputError, ConfigError) as exc:
        print(f"billing-bot: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a system we need is down: say which, briefly, without secrets
        print(f"billing-bot: {_describe_fatal(exc)}", file=sys.stderr)
        return 1
    return 0


def _describe_fatal(exc: Exception) -> str:
    import psycopg
    import psycopg_pool

    if isinstance(exc, psycopg.errors.QueryCanceled):
        return "a database query ran past its statement timeout: " + str(exc).splitlines()[0]
    if isinstance(exc, (psycopg.OperationalError, psycopg_pool.PoolTimeout)):
        return "cannot reach the control-plane database (DATABASE_URL): " + type(exc).__name__
    if isinstance(exc, psycopg.errors.UndefinedTable):
        return f"the control-plane database lacks a table the bot reads: {str(exc).splitlines()[0]}"
    return f"{type(exc).__name__}: {exc}"


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


if __name__ == "__main__":
    sys.exit(main())
