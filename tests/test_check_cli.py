"""`billing-bot check` end to end: the real CLI process, real PostgreSQL, our Kubernetes and Polar
servers, configured only through SPEC 5's environment variables."""
import json
import subprocess
import sys

from .seed import instance, record

CP_LINES = {
    "control-plane-a": ["2026/09/01 00:00:01 Creating instance i-7f3a (tier small, org o-acme)",
                        "2026/10/05 07:59:00 some unrelated chatter"],
    "control-plane-b": ["2026/10/06 12:00:00 Stopping instance i-other (requested by bob)"],
}


def check(env, *args):
    proc = subprocess.run([sys.executable, "-m", "bot.cli", "check", *args], env=env, capture_output=True,
                          text=True, timeout=120)
    return proc


def seed_worked_example(db, kube, polar):
    instance(db, "i-7f3a", tier="gpu", heartbeat="2026-10-05 09:00")
    record(db, 1, "i-7f3a", "2026-10-05 08:00", "2026-10-05 10:00", "4.16")
    record(db, 2, "i-7f3a", "2026-10-05 08:00", "2026-10-05 10:00", "4.16")
    record(db, 3, "i-7f3a", "2026-10-05 10:00", "2026-10-05 11:00", "2.08")
    kube.add_pod("orzbob-instances", "i-7f3a-0", {"instance-id": "i-7f3a", "org-id": "o-acme", "tier": "small"})
    kube.add_control_plane(CP_LINES)
    polar.add_customer("c-acme")


def test_worked_example_through_the_cli(db, kube, polar, bot_env):
    seed_worked_example(db, kube, polar)
    proc = check(bot_env, "i-7f3a", "--period", "2026-10", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["credit_cents"] == 1028 and out["required_level"] == 1 and out["systematic"] is False
    assert [(f["kind"], f["credit_cents"], f["hours"], f["record_ids"]) for f in out["findings"]] == [
        ("duplicate_charge", 416, "2.0000", [2]), ("stuck_instance", 312, "1.5000", [1, 3]),
        ("wrong_tier", 300, "1.5000", [1])]
    assert out["sources"] == {"database": "ok", "kubernetes": "ok", "polar": "ok"}
    assert (out["instance_id"], out["org_id"], out["customer_id"], out["periods"]) == ("i-7f3a", "o-acme", "c-acme", ["2026-10"])
    assert out["true_tier"] == "small"
    # both control-plane pods were read, through the deployment's selector
    log_paths = {r.path for r in kube.server.requests if r.path.endswith("/log")}
    assert log_paths == {f"/api/v1/namespaces/orzbob-system/pods/{p}/log" for p in CP_LINES}


def test_extra_polar_events_and_a_failed_pause_through_the_cli(db, kube, polar, bot_env):
    instance(db, "i-9b", tier="small", heartbeat="2026-10-07 00:00")
    record(db, 10, "i-9b", "2026-10-06 08:00", "2026-10-06 09:00", "0.083", tier="small", rate="0.083")
    kube.add_control_plane({"cp-0": ["2026/10/06 08:30:00 Failed to pause instance i-9b: context deadline exceeded"]})
    polar.add_customer("c-acme")
    for _ in range(3):
        polar.add_usage_event("c-acme", "compute_hours", {"org_id": "o-acme", "instance_id": "i-9b", "tier": "small",
                                                          "hours": 1, "start_time": "2026-10-06T08:00:00Z",
                                                          "end_time": "2026-10-06T09:00:00Z", "record_id": 10})
    polar.add_usage_event("c-acme", "compute_hours", {"instance_id": "i-other", "start_time": "2026-10-06T08:00:00Z",
                                                      "end_time": "2026-10-06T09:00:00Z"})
    out = json.loads(check(bot_env, "i-9b", "--period", "2026-10", "--json").stdout)
    assert [(f["kind"], f["credit_cents"]) for f in out["findings"]] == [("duplicate_charge", 17)]  # 2 x $0.083
    assert out["systematic"] is True


def test_sources_that_fail_say_why_and_the_check_goes_on(db, kube, polar, bot_env):
    seed_worked_example(db, kube, polar)
    kube.fail_paths[r"/log$"] = 500
    env = dict(bot_env, POLAR_API_URL="http://127.0.0.1:9")  # nothing listens there
    proc = check(env, "i-7f3a", "--period", "2026-10", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["sources"]["database"] == "ok"
    assert out["sources"]["kubernetes"].startswith("failed: control-plane logs: HTTP 500")
    assert out["sources"]["polar"].startswith("failed: usage events:")
    assert out["credit_cents"] == 1028  # the pod label still gave the tier; the database the rest


def test_text_report_is_readable(db, kube, polar, bot_env):
    seed_worked_example(db, kube, polar)
    proc = check(bot_env, "i-7f3a", "--period", "2026-10")
    assert proc.returncode == 0, proc.stderr
    assert "Credit: $10.28   Needed level: 1 (Support agent)" in proc.stdout
    assert "record #2 duplicates #1" in proc.stdout
    assert "pod i-7f3a-0 label tier=small" in proc.stdout


def test_bad_input_exits_2_with_one_line_naming_the_problem(db, bot_env):
    instance(db, "i-7f3a")
    for args, words in [(["I_BAD"], "invalid instance id"), (["i-nope"], "unknown instance"),
                        (["i-7f3a", "--period", "2026-13"], "malformed period"),
                        (["i-7f3a", "--period", "oct"], "malformed period")]:
        proc = check(bot_env, *args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert proc.stdout == ""
        assert len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr, proc.stderr


def test_no_secret_reaches_the_output(db, kube, polar, bot_env):
    seed_worked_example(db, kube, polar)
    proc = check(dict(bot_env, POLAR_API_URL="http://127.0.0.1:9"), "i-7f3a", "--json")
    assert "polar_oat_test_token" not in proc.stdout + proc.stderr
    assert "kube-test-token" not in proc.stdout + proc.stderr


def test_polar_url_without_key_is_used_and_polar_answers_unauthorized(db, kube, polar, bot_env):
    seed_worked_example(db, kube, polar)
    env = {k: v for k, v in bot_env.items() if k != "POLAR_API_KEY"}
    out = json.loads(check(env, "i-7f3a", "--period", "2026-10", "--json").stdout)
    assert out["sources"]["polar"].startswith("failed: usage events:") and "401" in out["sources"]["polar"]
    env.pop("POLAR_API_URL")
    out = json.loads(check(env, "i-7f3a", "--period", "2026-10", "--json").stdout)
    assert out["sources"]["polar"] == "not configured (no POLAR_API_KEY)" and out["credit_cents"] == 1028


def test_stop_windows_from_the_cluster(db, kube, polar, bot_env):
    from datetime import datetime, timezone
    instance(db, "i-k8s", tier="gpu", heartbeat="2026-10-09 00:00")
    for h in range(8, 16):  # 08:00-16:00 hourly, gpu at the gpu rate
        record(db, h, "i-k8s", f"2026-10-08 {h:02d}:00", f"2026-10-08 {h + 1:02d}:00", "2.08")
    kube.add_pod("orzbob-instances", "i-k8s-0", {"instance-id": "i-k8s", "org-id": "o-acme", "tier": "gpu"},
                 terminated_at=datetime(2026, 10, 8, 15, 30, tzinfo=timezone.utc))
    kube.add_control_plane({
        "cp-a": ["2026/10/08 09:00:00 Stopping instance i-k8s (requested by alice)"],
        "cp-b": ["2026/10/08 10:30:00 Resuming instance i-k8s"],
    })
    polar.add_customer("c-acme")
    out = json.loads(check(bot_env, "i-k8s", "--period", "2026-10", "--json").stdout)
    # stuck: 09:00-10:30 (stop until resume, lines from two pods) and 15:30-16:00 (pod terminated): 2 h of gpu
    assert [(f["kind"], f["credit_cents"], f["hours"]) for f in out["findings"]] == [("stuck_instance", 416, "2.0000")]
    evidence = " ".join(out["findings"][0]["evidence"])
    assert "stop requested by alice" in evidence and "pod i-k8s-0 terminated 2026-10-08 15:30 UTC" in evidence


# --- honest answers: coverage first, plain evidence, a next step --------------------------------

def lines_of(proc):
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def assert_dollars_and_cents(text):
    """Every amount a person reads is dollars and cents; only rates keep the card's digits."""
    import re
    for amount in re.findall(r"\$[\d,]+(?:\.\d+)?(?:/h)?", text):
        assert amount.endswith("/h") or re.fullmatch(r"\$[\d,]+\.\d\d", amount), amount


def test_a_period_without_records_is_not_an_all_clear(db, kube, polar, bot_env):
    seed_worked_example(db, kube, polar)
    lines = lines_of(check(bot_env, "i-7f3a", "--period", "2099-01"))
    assert lines[0] == "Coverage: no records: no billing records in 2099-01: there is no charge to judge."
    text = "\n".join(lines)
    assert "checks out" not in text
    assert "Findings: none. No wrong charges found because nothing was billed: there are no billing records in 2099-01." in lines
    assert lines[-1] == ("Next: nothing to credit: i-7f3a has no billing records in 2099-01. Check the instance id and "
                         "the period against the customer's invoice.")
    out = json.loads(check(bot_env, "i-7f3a", "--period", "2099-01", "--json").stdout)
    assert out["coverage"] == {"state": "no_records", "kinds": [],
                               "why": ["no billing records in 2099-01: there is no charge to judge"]}
    assert out["findings"] == [] and out["credit_cents"] == 0


def seed_clean(db, kube, polar):
    """Billed right: small at the small rate, the pod still running."""
    instance(db, "i-clean", tier="small", heartbeat="2026-10-09 00:00")
    record(db, 20, "i-clean", "2026-10-08 08:00", "2026-10-08 10:00", "0.166", tier="small", rate="0.083")
    kube.add_pod("orzbob-instances", "i-clean-0", {"instance-id": "i-clean", "org-id": "o-acme", "tier": "small"})
    kube.add_control_plane(CP_LINES)
    polar.add_customer("c-acme")


def test_only_a_complete_check_says_it_checks_out(db, kube, polar, bot_env):
    seed_clean(db, kube, polar)
    lines = lines_of(check(bot_env, "i-clean", "--period", "2026-10"))
    assert lines[0] == ("Coverage: complete: the database, Kubernetes and Polar answered; every kind of wrong charge "
                        "was judged.")
    assert "Findings: none. No wrong charges found: every billed hour in 2026-10 checks out." in lines
    assert lines[-1] == "Next: nothing to credit: every charge in these periods is right, and the customer can be told so."
    out = json.loads(check(bot_env, "i-clean", "--period", "2026-10", "--json").stdout)
    assert out["coverage"] == {"state": "complete", "kinds": [], "why": []}


def test_failed_sources_name_the_kinds_that_could_not_be_judged(db, kube, polar, bot_env):
    seed_clean(db, kube, polar)
    kube.fail_paths[r"/namespaces/orzbob-instances/pods$"] = 500
    kube.fail_paths[r"/log$"] = 500
    env = dict(bot_env, POLAR_API_URL="http://127.0.0.1:9")  # nothing listens there
    out = json.loads(check(env, "i-clean", "--period", "2026-10", "--json").stdout)
    cov = out["coverage"]
    assert cov["state"] == "partial" and cov["kinds"] == ["duplicate_charge", "stuck_instance", "wrong_tier"]
    assert [w.split(":")[0] for w in cov["why"]] == ["duplicate_charge", "stuck_instance", "stuck_instance", "wrong_tier"]
    assert "kubernetes failed: instance pods: HTTP 500" in cov["why"][1]
    assert "kubernetes failed: control-plane logs: HTTP 500" in cov["why"][2]
    assert out["findings"] == []
    lines = lines_of(check(env, "i-clean", "--period", "2026-10"))
    assert lines[0] == "Coverage: PARTIAL: not fully judged: duplicate_charge, stuck_instance, wrong_tier."
    # the same reasons as the JSON (which control-plane pod's log failed first may differ between runs)
    assert [line.split(" (kubernetes")[0].split(" (polar")[0] for line in lines[1:5]] == [
        "  - " + w.split(" (kubernetes")[0].split(" (polar")[0] for w in cov["why"]]
    assert lines[5] == ""
    text = "\n".join(lines)
    assert "checks out" not in text and "not an all-clear" in text
    assert lines[-1] == ("Next: nothing to credit from what could be judged, but do not tell the customer the bill is "
                         "right: duplicate_charge, stuck_instance, wrong_tier could not be fully judged; check again when "
                         "kubernetes and polar answer.")


def test_text_report_leads_with_coverage_and_ends_with_who_approves(db, kube, polar, bot_env):
    seed_worked_example(db, kube, polar)
    lines = lines_of(check(bot_env, "i-7f3a", "--period", "2026-10"))
    assert lines[0].startswith("Coverage: complete:")
    assert "  1. Billed more than once (duplicate_charge): $4.16  (2 h, record #2)" in lines
    assert "     - exact duplicate: record #2 duplicates #1, 10-05 08:00–10:00 UTC, 2 h" in lines
    assert "     1.5 h charged as gpu ($2.08/h) although the instance is small ($0.083/h): $3.00 overcharged" in lines
    assert lines[-1] == ("Next: someone at level 1 (Support agent) or higher can approve $10.28 in Slack "
                         "(/billing-check i-7f3a 2026-10 opens the case with Approve / Adjust / Reject; recent credits "
                         "to the same customer can raise the level there).")
    assert_dollars_and_cents("\n".join(lines))


def test_hourly_records_collapse_and_overlaps_are_named(db, kube, polar, bot_env):
    from datetime import datetime, timezone
    instance(db, "i-hr", tier="small", heartbeat="2026-10-09 00:00")
    for h in range(24):  # 10-05, hourly, after the pod ended the day before
        record(db, 1001 + h, "i-hr", f"2026-10-05 {h:02d}:00", f"2026-10-05 {h:02d}:59", "0.0817", tier="small",
               rate="0.083")
    record(db, 1100, "i-hr", "2026-10-04 20:00", "2026-10-04 22:00", "0.166", tier="small", rate="0.083")
    record(db, 1101, "i-hr", "2026-10-04 21:00", "2026-10-04 23:00", "0.166", tier="small", rate="0.083")
    kube.add_pod("orzbob-instances", "i-hr-0", {"instance-id": "i-hr", "org-id": "o-acme", "tier": "small"},
                 terminated_at=datetime(2026, 10, 4, 23, 10, tzinfo=timezone.utc))
    kube.add_control_plane(CP_LINES)
    polar.add_customer("c-acme")
    proc = check(bot_env, "i-hr", "--period", "2026-10")
    lines = lines_of(proc)
    assert ("     - records #1001-#1024, 10-05 00:00–23:59 UTC, 23.6 h: pod i-hr-0 terminated 2026-10-04 23:10 UTC"
            in lines), proc.stdout
    assert ("     - partial overlap: record #1101 (billed 10-04 21:00–23:00 UTC) overlaps #1100, 10-04 21:00–22:00 UTC, 1 h"
            in lines), proc.stdout
    assert "more records" not in proc.stdout and "…and" not in proc.stdout
    assert_dollars_and_cents(proc.stdout)
    out = json.loads(check(bot_env, "i-hr", "--period", "2026-10", "--json").stdout)
    stuck = next(f for f in out["findings"] if f["kind"] == "stuck_instance")
    assert stuck["record_ids"] == list(range(1001, 1025)) and stuck["credit_cents"] == 196  # 24 x $0.0817


def test_the_cli_does_not_claim_to_tell_engineering(db, kube, polar, bot_env):
    instance(db, "i-9b", tier="small", heartbeat="2026-10-07 00:00")
    record(db, 10, "i-9b", "2026-10-06 08:00", "2026-10-06 09:00", "0.083", tier="small", rate="0.083")
    record(db, 11, "i-9b", "2026-10-06 08:00", "2026-10-06 09:00", "0.083", tier="small", rate="0.083")
    kube.add_control_plane({"cp-0": ["2026/10/06 08:30:00 Failed to pause instance i-9b: context deadline exceeded"]})
    polar.add_customer("c-acme")
    proc = check(bot_env, "i-9b", "--period", "2026-10")
    assert "engineering is told" not in proc.stdout
    assert ("Systematic: the CLI tells no one; in Slack this case would also go to engineering (level 3), whatever the "
            "amount, and the approval would still need level 1 (Support agent).") in lines_of(proc)
    assert "  - throttle failed to pause i-9b at 2026-10-06 08:30 UTC: context deadline exceeded" in lines_of(proc)
