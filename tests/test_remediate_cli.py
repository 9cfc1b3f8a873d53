"""`billing-bot check customer|org`, `remediate`, `report --usage` and `watch` end to end: the real
CLI process, real PostgreSQL, our Kubernetes and Polar servers."""
import csv
import json
import subprocess
import sys

import psycopg

from .seed import instance, record, ts


def cli(env, *args):
    return subprocess.run([sys.executable, "-m", "bot.cli", *args], env=env, capture_output=True, text=True,
                          timeout=180)


def seed_incident(db, kube, polar):
    """A metering retry storm on 10-05: three customers' instances billed twice; one also stuck."""
    instance(db, "i-a1", org="o-a", customer="c-a", tier="small", heartbeat="2026-10-06 00:00")
    instance(db, "i-a2", org="o-a", customer="c-a", tier="small", heartbeat="2026-10-06 00:00")
    instance(db, "i-b1", org="o-a", customer="c-b", tier="gpu", heartbeat="2026-10-06 00:00")
    instance(db, "i-c1", org="o-c", customer="c-c", tier="small", status="stopped", stopped_at="2026-10-05 09:00",
             heartbeat="2026-10-05 09:00")
    instance(db, "i-d1", org="o-c", customer="c-d", tier="small", heartbeat="2026-10-06 00:00")  # clean
    small = dict(tier="small", rate="0.083")
    record(db, 1, "i-a1", "2026-10-05 08:00", "2026-10-05 10:00", "0.166", org="o-a", customer="c-a", **small)
    record(db, 2, "i-a1", "2026-10-05 08:00", "2026-10-05 10:00", "0.166", org="o-a", customer="c-a", **small)
    record(db, 3, "i-a2", "2026-10-05 08:00", "2026-10-05 09:00", "0.083", org="o-a", customer="c-a", **small)
    record(db, 4, "i-a2", "2026-10-05 08:00", "2026-10-05 09:00", "0.083", org="o-a", customer="c-a", **small)
    record(db, 5, "i-b1", "2026-10-05 08:00", "2026-10-05 10:00", "4.16", org="o-a", customer="c-b")
    record(db, 6, "i-b1", "2026-10-05 08:00", "2026-10-05 10:00", "4.16", org="o-a", customer="c-b")
    record(db, 7, "i-c1", "2026-10-05 08:00", "2026-10-05 10:00", "0.166", org="o-c", customer="c-c", **small)
    record(db, 8, "i-c1", "2026-10-05 08:00", "2026-10-05 10:00", "0.166", org="o-c", customer="c-c", **small)
    record(db, 9, "i-d1", "2026-10-05 08:00", "2026-10-05 10:00", "0.166", org="o-c", customer="c-d", **small)
    record(db, 10, "i-a1", "2026-09-05 08:00", "2026-09-05 10:00", "0.166", org="o-a", customer="c-a", **small)
    record(db, 11, "i-a1", "2026-09-05 08:00", "2026-09-05 10:00", "0.166", org="o-a", customer="c-a", **small)
    for iid, tier in (("i-a1", "small"), ("i-a2", "small"), ("i-b1", "gpu"), ("i-d1", "small")):
        kube.add_pod("orzbob-instances", f"{iid}-0", {"instance-id": iid, "org-id": "o-a", "tier": tier})
    kube.add_control_plane({"cp-0": ["2026/10/01 00:00:00 some unrelated chatter"]})
    for c in ("c-a", "c-b", "c-c", "c-d"):
        polar.add_customer(c)


def test_remediate_dry_run_json_and_csv(db, kube, polar, bot_env, tmp_path):
    seed_incident(db, kube, polar)
    out_csv = tmp_path / "plan.csv"
    proc = cli(bot_env, "remediate", "--kind", "duplicate_charge", "--period", "2026-10", "--dry-run", "--json",
               "--csv", str(out_csv))
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan == {
        "kind": "duplicate_charge", "period": "2026-10",
        "customers": [{"customer_id": "c-b", "instance_ids": ["i-b1"], "hours": "2.0000", "credit_cents": 416},
                      {"customer_id": "c-a", "instance_ids": ["i-a1", "i-a2"], "hours": "3.0000", "credit_cents": 25},
                      {"customer_id": "c-c", "instance_ids": ["i-c1"], "hours": "2.0000", "credit_cents": 17}],
        "total_cents": 458, "required_level": 1, "other_kinds": {"stuck_instance": 1}}
    rows = list(csv.reader(out_csv.open()))
    assert rows == [["customer_id", "instance_ids", "hours", "credit_cents"], ["c-b", "i-b1", "2.0000", "416"],
                    ["c-a", "i-a1 i-a2", "3.0000", "25"], ["c-c", "i-c1", "2.0000", "17"]]
    # the plan's customers equal the per-customer checks' findings of the kind
    for cust in ("c-a", "c-b", "c-c"):
        one = json.loads(cli(bot_env, "check", "customer", cust, "--period", "2026-10", "--json").stdout)
        dup = sum(f["credit_cents"] for i in one["instances"] for f in i["findings"] if f["kind"] == "duplicate_charge")
        assert dup == next(c["credit_cents"] for c in plan["customers"] if c["customer_id"] == cust)


def test_remediate_text_and_without_slack_it_stores_nothing(db, kube, polar, bot_env, db_url):
    seed_incident(db, kube, polar)
    proc = cli(bot_env, "remediate", "--kind", "duplicate_charge", "--period", "2026-10")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "billing-bot: remediate: a plan is approved in Slack, so posting it needs SLACK_BOT_TOKEN and "
        "channels.escalation in the configuration; nothing was stored (use --dry-run for the plan alone)"]
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT to_regclass('billing_bot.remediation_batches')").fetchone()[0] is None or \
            conn.execute("SELECT count(*) FROM billing_bot.remediation_batches").fetchone()[0] == 0
    proc = cli(bot_env, "remediate", "--kind", "duplicate_charge", "--period", "2026-10", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "Remediation plan: Billed more than once (duplicate_charge) in 2026-10 (dry run)"
    assert "3 customers, 4 instances, 7 h: $4.58   Needed level: 1 (Support agent)" in lines
    assert "  1. c-b: $4.16  (2 h, 1 instance: i-b1)" in lines
    assert "  - stuck_instance: 1 customer" in lines
    assert lines[-1].startswith("Plan fingerprint: ") and len(lines[-1].split()[-1]) == 64


def test_remediate_without_dry_run_stores_the_batch_and_posts_the_plan_for_approval(db, kube, polar, bot_env,
                                                                                   db_url, tmp_path):
    from .fakes.slack_server import BOT_TOKEN, FakeSlack
    seed_incident(db, kube, polar)
    slack = FakeSlack().start()
    try:
        cfg = tmp_path / "c.yaml"
        cfg.write_text("channels: {escalation: C_ESC, engineering: C_ENG}\nlevels: {1: {users: [U_AGENT]}}\n")
        env = {**bot_env, "SLACK_BOT_TOKEN": BOT_TOKEN, "SLACK_API_URL": slack.api_url, "BILLING_BOT_CONFIG": str(cfg)}
        proc = cli(env, "remediate", "--kind", "duplicate_charge", "--period", "2026-10", "--json")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        with psycopg.connect(db_url) as conn:
            (bid, state, total, fp, channel, ts), = conn.execute(
                "SELECT id, state, total_cents, fingerprint, channel_id, message_ts"
                " FROM billing_bot.remediation_batches").fetchall()
        assert proc.stderr.strip().splitlines()[-1] == f"batch-{bid} stored, posted to C_ESC for approval"
        assert state == "planned" and total == out["total_cents"] == 458 and channel == "C_ESC" and ts
        plan_msg = [m for m in slack.of("chat.postMessage") if m["channel"] == "C_ESC"][0]
        assert plan_msg["text"].startswith(f"Remediation plan batch-{bid}: duplicate_charge 2026-10")
        assert "Planned by `billing-bot remediate` (" in json.dumps(plan_msg["blocks"])  # not a broken <@cli:…>
        files = slack.shared_files("C_ESC", ts)
        assert [f["filename"] for f in files] == [f"batch-{bid}-duplicate_charge-2026-10.csv"]
        assert [m for m in slack.of("chat.postMessage") if m["channel"] == "C_ENG"]  # engineering is told
    finally:
        slack.stop()


def test_check_customer_and_org_through_the_cli(db, kube, polar, bot_env):
    seed_incident(db, kube, polar)
    out = json.loads(cli(bot_env, "check", "customer", "c-a", "--period", "2026-10", "--json").stdout)
    assert out["instance_id"] is None and out["customer_id"] == "c-a" and out["org_id"] == "o-a"
    assert [(i["instance_id"], i["credit_cents"]) for i in out["instances"]] == [("i-a1", 17), ("i-a2", 8)]
    assert out["credit_cents"] == 25 and out["required_level"] == 1
    assert out["coverage"]["state"] == "complete"
    singles = [json.loads(cli(bot_env, "check", i, "--period", "2026-10", "--json").stdout) for i in ("i-a1", "i-a2")]
    assert [i["findings"] for i in out["instances"]] == [s["findings"] for s in singles]

    orgs = json.loads(cli(bot_env, "check", "org", "o-a", "--period", "2026-10", "--json").stdout)
    assert isinstance(orgs, list) and [o["customer_id"] for o in orgs] == ["c-a", "c-b"]
    assert [o["credit_cents"] for o in orgs] == [25, 416] and all(o["org_id"] == "o-a" for o in orgs)

    text = cli(bot_env, "check", "customer", "c-a", "--period", "2026-10")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith("Coverage: complete")
    assert "Customer c-a: 2 instances billed in 2026-10" in lines
    assert "Credit: $0.25   Needed level: 1 (Support agent)" in lines

    nothing = json.loads(cli(bot_env, "check", "customer", "c-zz", "--period", "2026-10", "--json").stdout)
    assert nothing["coverage"]["state"] == "no_records" and nothing["instances"] == [] and nothing["credit_cents"] == 0


def test_bad_input_exits_2_with_one_line(db, bot_env):
    for args, words in [(["check", "customer"], "customer id is missing"),
                        (["check", "customer", "c a"], "invalid customer id"),
                        (["check", "org", "<!here>"], "invalid org id"),
                        (["check", "i-1", "extra"], "unexpected argument"),
                        (["remediate", "--kind", "refund_all", "--period", "2026-10"], "unknown finding kind"),
                        (["remediate", "--kind", "wrong_tier", "--period", "2026-13"], "malformed period"),
                        (["report", "--usage"], "--month YYYY-MM is needed"),
                        (["report", "--usage", "--month", "10-2026"], "malformed month"),
                        (["report"], "--since YYYY-MM-DD is needed"),
                        (["watch", "add"], "customer id is missing"),
                        (["watch", "add", "bad id!"], "invalid customer id"),
                        (["watch", "list", "c-a"], "takes no customer id")]:
        proc = cli(bot_env, *args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert proc.stdout == ""
        assert len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr, (args, proc.stderr)


def test_watch_add_remove_list(db, bot_env):
    assert cli(bot_env, "watch", "list").stdout == "the watchlist is empty\n"
    assert cli(bot_env, "watch", "add", "c-a", "throttle", "failed").stdout == "c-a added to the watchlist\n"
    assert cli(bot_env, "watch", "add", "c-a", "again").stdout == "c-a is already on the watchlist\n"
    assert cli(bot_env, "watch", "add", "c-b").returncode == 0
    rows = [line.split("\t") for line in cli(bot_env, "watch", "list").stdout.splitlines()]
    assert [(r[0], r[3]) for r in rows] == [("c-a", "throttle failed"), ("c-b", "")]
    assert all(r[2].startswith("cli:") for r in rows)
    assert cli(bot_env, "watch", "remove", "c-a").stdout == "c-a removed from the watchlist\n"
    assert cli(bot_env, "watch", "remove", "c-a").stdout == "c-a was not on the watchlist\n"
    assert [line.split("\t")[0] for line in cli(bot_env, "watch", "list").stdout.splitlines()] == ["c-b"]


def test_usage_report_sums_against_the_records(db, db_url, bot_env):
    import random
    from decimal import Decimal
    rng = random.Random(5)
    rid = 1
    for n in range(30):
        cust = f"c-{n % 7}"
        for _ in range(rng.randrange(1, 6)):
            h = rng.randrange(0, 20)
            charge = Decimal(rng.randrange(1, 100_000)) / 10_000
            record(db, rid, f"i-{n}", f"2026-10-{1 + h:02d} 08:00", f"2026-10-{1 + h:02d} 10:00", str(charge),
                   customer=cust, org=f"o-{n % 3}")
            rid += 1
    record(db, rid, "i-0", "2026-09-30 08:00", "2026-09-30 10:00", "99.0", customer="c-0")  # another month
    db.execute("INSERT INTO billing_corrections (id, customer_id, ticket_id, issue_type, credit_amount, resolved_by,"
               " resolved_at) VALUES (1,'c-1','T-1','stuck_instance',1.25,'U1',%s), (2,'c-1','T-2','wrong_tier',0.50,"
               "'U1',%s), (3,'c-1','T-3','wrong_tier',9.00,'U1',%s)",
               (ts("2026-10-10 00:00"), ts("2026-10-31 23:59"), ts("2026-11-01 00:00")))
    assert cli(bot_env, "watch", "add", "c-2", "audit").returncode == 0
    proc = cli(bot_env, "report", "--usage", "--month", "2026-10", "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    with psycopg.connect(db_url) as conn:
        want = conn.execute("SELECT customer_id, count(DISTINCT instance_id), sum(hours_used), sum(total_charge)"
                            " FROM billing_records WHERE billing_period = '2026-10' GROUP BY customer_id").fetchall()
    by = {c["customer_id"]: c for c in rep["customers"]}
    assert set(by) == {w[0] for w in want} and rep["total_customers"] == 7
    for cust, n, hours, charge in want:
        assert by[cust]["instances"] == n
        assert Decimal(by[cust]["hours"]) == hours
        assert by[cust]["charge_cents"] == int((charge * 100).quantize(Decimal(1), rounding="ROUND_HALF_UP"))
    assert [c["charge_cents"] for c in rep["customers"]] == sorted((c["charge_cents"] for c in rep["customers"]),
                                                                   reverse=True)
    assert (by["c-1"]["credits"], by["c-1"]["credits_cents"]) == (2, 175)  # November's credit is not October's
    assert [c for c in by if by[c]["watchlist"]] == ["c-2"]
    text = cli(bot_env, "report", "--usage", "--month", "2026-10").stdout
    assert "; WATCHLIST" in next(line for line in text.splitlines() if " c-2:" in line)
    assert text.splitlines()[0].startswith("Usage in 2026-10: 7 customers billed")


def test_time_another_case_holds_is_left_out_of_the_plan_and_said_so(db, db_url, kube, polar, bot_env):
    """c-b's duplicate is held by a pending case: the plan credits the others and names that case."""
    import asyncio

    from services.db import Database
    from services.store import CaseStore

    seed_incident(db, kube, polar)

    async def migrate():
        dbx = await Database.connect(db_url)
        try:
            await CaseStore(dbx).migrate()
        finally:
            await dbx.close()
    asyncio.run(migrate())
    case_id = db.execute(
        "INSERT INTO billing_bot.cases (instance_id, org_id, customer_id, periods, state, proposed_cents, credit_cents,"
        " required_level, kinds, report, requested_by) VALUES ('i-b1','o-a','c-b','{2026-10}','pending',416,416,1,"
        "'{duplicate_charge}','{}','U1') RETURNING id").fetchone()[0]
    lo, hi = (int(ts(t).timestamp() * 1_000_000) for t in ("2026-10-05 08:00", "2026-10-05 10:00"))
    db.execute("INSERT INTO billing_bot.case_pieces (case_id, kind, record_id, start_us, end_us) VALUES"
               " (%s,'duplicate_charge',6,%s,%s)", (case_id, lo, hi))
    plan = json.loads(cli(bot_env, "remediate", "--kind", "duplicate_charge", "--period", "2026-10", "--dry-run",
                          "--json").stdout)
    assert [c["customer_id"] for c in plan["customers"]] == ["c-a", "c-c"] and plan["total_cents"] == 42
    text = cli(bot_env, "remediate", "--kind", "duplicate_charge", "--period", "2026-10", "--dry-run").stdout
    assert f"  - i-b1 (c-b): case {case_id} (pending)" in text.splitlines()
    assert "Left out, held by other cases (issued, or open until decided):" in text
