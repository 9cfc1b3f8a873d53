"""reconcile --shard K/N: the day split by org hash, merged through reconcile_runs, posted once;
the systematic counts of the latest reconciled day; a future date refused."""
import asyncio
import json
import subprocess
import sys
from datetime import date, datetime, timedelta, timezone

import pytest

from services.config import parse_config
from services.db import Database
from services.reconcile import reconcile_day
from services.reconcile_shards import claim_post, merge_if_complete, save_shard
from services.store import Store

from .fakes.slack_server import BOT_TOKEN, FakeSlack
from .seed import instance, record
from .test_reconcile import run, seed_all_kinds
from .test_reconcile_oracle import make_day

DAY = date(2026, 10, 5)


def keyed(rec):
    return sorted((a.kind, a.instance_id or "", a.org_id, a.customer_id, a.record_ids, a.overcharge_cents, a.detail)
                  for a in rec.anomalies)


def by_shards(db_url, day, n):
    async def go():
        dbx = await Database.connect(db_url)
        try:
            parts = []
            for k in range(n):
                async with dbx.snapshot() as conn:
                    parts.append(await reconcile_day(conn, day, parse_config({}), (k, n)))
            return parts
        finally:
            await dbx.close()
    return asyncio.run(go())


@pytest.mark.parametrize("n", [2, 3, 4])
def test_the_shards_together_are_the_whole_day(db, db_url, n):
    seed_all_kinds(db)  # ten orgs, every kind
    whole = run(db_url, DAY)
    parts = by_shards(db_url, DAY, n)
    assert sum(len(p.anomalies) for p in parts) == len(whole.anomalies) == 9
    assert sorted(x for p in parts for x in keyed(p)) == keyed(whole)
    # each org lies in exactly one shard
    orgs = [{a.org_id for a in p.anomalies} for p in parts]
    assert all(not (orgs[i] & orgs[j]) for i in range(n) for j in range(i + 1, n))
    assert sum(1 for o in orgs if o) >= 2, "the hash put every org in one shard: the split proves nothing"


def test_shards_of_a_storm_day_agree_with_the_whole_day(db, db_url):
    make_day(db, 11, storm=True)
    whole = run(db_url, DAY)
    assert {a.kind for a in whole.anomalies} >= {"overlap", "duplicate", "daily_limit"}
    assert sorted(x for p in by_shards(db_url, DAY, 4) for x in keyed(p)) == keyed(whole)


def test_concurrent_last_shards_merge_and_claim_the_post_exactly_once(db, db_url):
    seed_all_kinds(db)
    parts = by_shards(db_url, DAY, 3)

    async def go():
        dbx = await Database.connect(db_url, max_size=12)
        try:
            await Store(dbx).migrate()
            for k, p in enumerate(parts):
                await save_shard(dbx, "job-1", (k, 3), p)

            async def finisher():  # every shard believes it may be the last
                merged = await merge_if_complete(dbx, "job-1", DAY, 3)
                return merged is not None and await claim_post(dbx, "job-1")
            claims = await asyncio.gather(*[finisher() for _ in range(10)])
            async with dbx.pool.connection() as conn:
                runs = await (await conn.execute(
                    "SELECT totals, posted_at FROM billing_bot.reconcile_runs WHERE run_key = 'job-1' AND shard IS NULL"
                )).fetchall()
            return claims, runs
        finally:
            await dbx.close()
    claims, runs = asyncio.run(go())
    assert sum(claims) == 1
    assert len(runs) == 1 and runs[0]["posted_at"] is not None
    assert runs[0]["totals"] == run(db_url, DAY).totals()


def test_an_incomplete_run_is_not_merged(db, db_url):
    seed_all_kinds(db)
    parts = by_shards(db_url, DAY, 2)

    async def go():
        dbx = await Database.connect(db_url)
        try:
            await save_shard(dbx, "job-2", (1, 2), parts[1])
            await save_shard(dbx, "job-2", (1, 2), parts[1])  # a retried shard replaces its row
            return await merge_if_complete(dbx, "job-2", DAY, 2), await claim_post(dbx, "job-2")
        finally:
            await dbx.close()
    assert asyncio.run(go()) == (None, False)


def test_shard_processes_post_the_whole_day_once(db, db_url, tmp_path):
    seed_all_kinds(db)
    slack = FakeSlack().start()
    try:
        cfg = tmp_path / "c.yaml"
        cfg.write_text("channels: {alerts: C_ALERTS}\n")
        env = {"DATABASE_URL": db_url, "SLACK_BOT_TOKEN": BOT_TOKEN, "SLACK_API_URL": slack.api_url,
               "BILLING_BOT_CONFIG": str(cfg), "PATH": "/usr/bin:/bin"}
        procs = [subprocess.Popen([sys.executable, "-m", "bot.cli", "reconcile", "--date", "2026-10-05", "--post",
                                   "--json", "--shard", f"{k}/4", "--run", "cron-1"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(4)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, [e for _, e in outs]
        parts = [json.loads(o) for o, _ in outs]
        assert sum(len(p["anomalies"]) for p in parts) == 9
        posted = slack.of("chat.postMessage")
        assert len(posted) == 1 and posted[0]["channel"] == "C_ALERTS"
        assert "*9 anomalies*" in json.dumps(posted[0]["blocks"])
    finally:
        slack.stop()


def test_a_malformed_shard_is_refused(db_url, bot_env):
    proc = subprocess.run([sys.executable, "-m", "bot.cli", "reconcile", "--date", "2026-10-05", "--shard", "4/4"],
                          env=bot_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "malformed shard '4/4'" in proc.stderr


def test_a_date_after_today_is_refused_with_one_line(db_url, bot_env):
    tomorrow = (datetime.now(timezone.utc) + timedelta(days=1)).date().isoformat()
    proc = subprocess.run([sys.executable, "-m", "bot.cli", "reconcile", "--date", tomorrow], env=bot_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and f"date {tomorrow} is after today" in proc.stderr


def test_systematic_counts_come_from_the_latest_day_not_the_latest_run(db, db_url):
    for i in range(3):  # the same duplicate for three customers on 10-05
        instance(db, f"i-s{i}", org=f"o-s{i}", customer=f"c-s{i}", heartbeat="2026-10-05 23:59")
        for rid in (10 * i + 1, 10 * i + 2):
            record(db, rid, f"i-s{i}", "2026-10-05 08:00", "2026-10-05 09:00", "2.08", org=f"o-s{i}",
                   customer=f"c-s{i}")

    async def go():
        dbx = await Database.connect(db_url)
        try:
            store = Store(dbx)
            for day in (date(2026, 10, 5), date(2026, 10, 1)):  # then an ad-hoc run of an older, clean day
                async with dbx.snapshot() as conn:
                    await store.record_reconciliation(await reconcile_day(conn, day, parse_config({})))
            async with dbx.snapshot() as conn:
                kept = await dbx.systematic_counts(conn, ["2026-10"])
            # a shard's row is no whole-day run: it never counts, even for a later day
            async with dbx.snapshot() as conn:
                part = await reconcile_day(conn, date(2026, 10, 6), parse_config({}), (0, 2))
            await save_shard(dbx, "later", (0, 2), part)
            async with dbx.snapshot() as conn:
                with_shard = await dbx.systematic_counts(conn, ["2026-10"])
            # the latest day reconciled again replaces them
            db.execute("DELETE FROM billing_records WHERE id = 2")
            async with dbx.snapshot() as conn:
                await store.record_reconciliation(await reconcile_day(conn, date(2026, 10, 5), parse_config({})))
            async with dbx.snapshot() as conn:
                again = await dbx.systematic_counts(conn, ["2026-10"])
            return kept, with_shard, again
        finally:
            await dbx.close()
    kept, with_shard, again = asyncio.run(go())
    assert kept == {"duplicate_charge": 3}
    assert with_shard == {"duplicate_charge": 3}
    assert again == {"duplicate_charge": 2}


@pytest.mark.parametrize("storm", [False, True])
def test_a_day_streamed_in_partitions_equals_the_oracle(db, db_url, monkeypatch, storm):
    """A big day runs as several statements over org-hash partitions; forced here with a tiny
    partition size, the result must still be the oracle's, kind for kind and cent for cent."""
    from services import reconcile

    from . import reconcile_reference as ref
    from .test_reconcile_oracle import CARD, DEFAULTS, LO, US, _us

    records, instances, throttles, usage = make_day(db, 21, storm)
    whole = run(db_url, DAY)
    monkeypatch.setattr(reconcile, "PARTITION_ROWS", 40)  # about 10 partitions of this day
    parted = run(db_url, DAY)
    want = ref.reconcile(records, instances, throttles, usage, _us(LO), _us(LO) + 86400 * US, CARD, DEFAULTS,
                         parse_config({}).usage_tolerance_hours)
    got = {(a.kind, a.instance_id or a.org_id): (a.customer_id, a.record_ids, a.overcharge_cents)
           for a in parted.anomalies}
    assert got == want and keyed(parted) == keyed(whole)


def test_a_failed_post_is_handed_back_and_the_retried_shard_posts_it_once(db, db_url, tmp_path):
    seed_all_kinds(db)
    slack = FakeSlack().start()
    try:
        cfg = tmp_path / "c.yaml"
        cfg.write_text("channels: {alerts: C_ALERTS}\n")
        env = {"DATABASE_URL": db_url, "SLACK_BOT_TOKEN": BOT_TOKEN, "SLACK_API_URL": slack.api_url,
               "BILLING_BOT_CONFIG": str(cfg), "PATH": "/usr/bin:/bin"}

        def shard(k):
            return subprocess.run([sys.executable, "-m", "bot.cli", "reconcile", "--date", "2026-10-05", "--post",
                                   "--shard", f"{k}/2", "--run", "cron-2"], env=env, capture_output=True, text=True,
                                  timeout=120)
        assert shard(0).returncode == 0 and slack.of("chat.postMessage") == []  # half the day: nothing to post
        slack.fail("chat.postMessage", "channel_not_found")
        failed = shard(1)  # completes the day, claims the post, and Slack refuses it
        assert failed.returncode == 1 and "channel_not_found" in failed.stderr
        assert shard(1).returncode == 0  # the Job's retry of that shard
        assert shard(0).returncode == 0  # a late retry of the other one posts nothing more
        ok = [p for p in slack.of("chat.postMessage") if p.get("channel") == "C_ALERTS"]
        assert len(ok) == 2  # the refused attempt and the one post
        assert "*9 anomalies*" in json.dumps(ok[-1]["blocks"])
        posted = db.execute("SELECT count(*) FROM billing_bot.reconcile_runs WHERE run_key = 'cron-2'"
                            " AND shard IS NULL AND posted_at IS NOT NULL").fetchone()[0]
        assert posted == 1
    finally:
        slack.stop()
