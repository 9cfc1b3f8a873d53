"""Coverage (SPEC 5): which finding kinds a check could not fully judge, for every combination of
missing evidence, and the sentences built on it."""
from itertools import combinations, product

import pytest

from handlers.coverage import (AFFECTED_BY_STUCK, COMPLETE, NO_RECORDS, PARTIAL, Evidence, coverage, coverage_line,
                               next_step, no_findings_text)
from handlers.model import KINDS

PODS, LOGS, POLAR = "failed: instance pods: HTTP 500", "failed: control-plane logs: HTTP 500", "failed: usage events: 503"


def ev(records=3, pods=None, logs=None, polar=None, tier_from_pod=True, on_card=True, findings=()):
    return Evidence(periods=("2026-10",), records_in_periods=records, pods_problem=pods, logs_problem=logs,
                    polar_problem=polar, tier_from_pod=tier_from_pod, true_tier="small", tier_on_card=on_card,
                    finding_kinds=frozenset(findings))


def expected_kinds(pods, logs, polar, tier_from_pod, on_card, findings) -> set[str]:
    """SPEC 2.2, kind by kind: what each step reads, and what a missing step 2 does to steps 3-5."""
    kinds = set()
    if polar:  # step 1's Polar part: extra metering events
        kinds.add("duplicate_charge")
    if pods or logs:  # step 2: pod ends and the Stopping/Reaping/Pausing..Resuming lines
        kinds.add("stuck_instance")
        kinds |= set(findings) & set(AFFECTED_BY_STUCK)  # their hours may be stuck time
    if pods or (logs and not tier_from_pod) or not on_card:  # step 5: the true tier and its price
        kinds.add("wrong_tier")
    return kinds


SUBSETS = [set(c) for n in range(len(KINDS) + 1) for c in combinations(KINDS, n)]


@pytest.mark.parametrize("pods,logs,polar,tier_from_pod,on_card",
                         list(product([None, PODS], [None, LOGS], [None, POLAR], [True, False], [True, False])))
def test_every_combination_of_missing_evidence(pods, logs, polar, tier_from_pod, on_card):
    for findings in SUBSETS:
        cov = coverage(ev(pods=pods, logs=logs, polar=polar, tier_from_pod=tier_from_pod and not pods,
                          on_card=on_card, findings=findings))
        want = expected_kinds(pods, logs, polar, tier_from_pod and not pods, on_card, findings)
        assert set(cov.kinds) == want, (pods, logs, polar, tier_from_pod, on_card, findings)
        assert cov.state == (PARTIAL if want else COMPLETE)
        assert list(cov.kinds) == [k for k in KINDS if k in want]  # SPEC 2.2's order
        # every kind says why, every why names its kind, and names the source that was missing
        assert {w.split(":")[0] for w in cov.why} == want
        for w in cov.why:
            kind = w.split(":")[0]
            if kind == "duplicate_charge":
                assert POLAR in w
            elif kind == "stuck_instance":
                assert (PODS in w) or (LOGS in w)
        assert cov.as_json() == {"state": cov.state, "kinds": list(cov.kinds), "why": list(cov.why)}


def test_no_records_is_its_own_state_whatever_failed():
    for pods, logs, polar in product([None, PODS], [None, LOGS], [None, POLAR]):
        cov = coverage(ev(records=0, pods=pods, logs=logs, polar=polar, findings=()))
        assert cov.state == NO_RECORDS and cov.kinds == ()
        assert cov.why == ("no billing records in 2026-10: there is no charge to judge",)


def test_kubernetes_down_names_step_2_and_5_and_the_findings_after_step_2():
    both = "failed: instance pods: timed out; control-plane logs: timed out"
    cov = coverage(ev(pods=both, logs=both, tier_from_pod=False, findings={"duplicate_charge", "throttle_continuous"}))
    assert cov.kinds == ("stuck_instance", "throttle_continuous", "wrong_tier")
    assert cov.why[0] == f"stuck_instance: pod termination and deletion not seen (kubernetes {both})"
    assert any(w.startswith("throttle_continuous: some of its hours may be stuck time") for w in cov.why)
    assert any(w.startswith("wrong_tier: the pod's tier label") and "small, may be wrong" in w for w in cov.why)


def test_logs_down_but_a_pod_label_decides_the_tier():
    cov = coverage(ev(logs=LOGS, tier_from_pod=True))
    assert cov.kinds == ("stuck_instance",)


def test_tier_missing_from_the_rate_card():
    cov = coverage(ev(on_card=False))
    assert cov.kinds == ("wrong_tier",)
    assert cov.why == ("wrong_tier: the true tier 'small' is not on the rate card: tier pricing not checked",)


def test_only_complete_coverage_says_it_checks_out():
    complete = coverage(ev()).as_json()
    partial = coverage(ev(polar=POLAR)).as_json()
    none = coverage(ev(records=0)).as_json()
    assert no_findings_text(complete, ["2026-10"]) == "No wrong charges found: every billed hour in 2026-10 checks out."
    assert no_findings_text(complete, ["2026-10"], credited_before=1) == (
        "Nothing left to credit: what was billed wrongly in 2026-10 was credited before.")
    for cov in (partial, none, None):
        assert "checks out" not in no_findings_text(cov, ["2026-10"])
    assert "not an all-clear" in no_findings_text(partial, ["2026-10"])
    assert no_findings_text(none, ["2099-01"]).endswith("there are no billing records in 2099-01.")
    assert coverage_line(partial) == "Coverage: PARTIAL: not fully judged: duplicate_charge."
    assert coverage_line(None).startswith("Coverage: not recorded")
    assert coverage_line(complete).startswith("Coverage: complete:")


def test_next_step_names_who_approves_or_why_nothing_is_owed():
    ok = {"database": "ok", "kubernetes": "ok", "polar": "ok"}
    kw = dict(level_text="1 (Support agent)", instance_id="i-7f3a", periods=["2026-10"])
    assert next_step(coverage(ev()), credit_cents=1028, sources=ok, **kw).startswith(
        "Next: someone at level 1 (Support agent) or higher can approve $10.28 in Slack (/billing-check i-7f3a 2026-10 ")
    partial = next_step(coverage(ev(polar=POLAR)), credit_cents=1028, sources=dict(ok, polar=POLAR), **kw)
    assert "duplicate_charge could not be fully judged, so check again when polar answers before approving" in partial
    assert next_step(coverage(ev()), credit_cents=0, sources=ok, **kw) == (
        "Next: nothing to credit: every charge in these periods is right, and the customer can be told so.")
    assert next_step(coverage(ev()), credit_cents=0, sources=ok, credited_before=1, **kw).startswith(
        "Next: nothing left to credit: what was billed wrongly was credited before")
    nothing = next_step(coverage(ev(pods=PODS, logs=PODS)), credit_cents=0,
                        sources=dict(ok, kubernetes=PODS, polar=POLAR), **kw)
    assert "do not tell the customer the bill is right" in nothing and "when kubernetes and polar answer" in nothing
    unconfigured = next_step(coverage(ev(polar="not configured (no POLAR_API_KEY)")), credit_cents=0,
                             sources=dict(ok, polar="not configured (no POLAR_API_KEY)"), **kw)
    assert unconfigured.endswith("could not be fully judged; check again when polar is configured.")
    both = next_step(coverage(ev(pods=PODS, logs=PODS, polar="not configured (no POLAR_API_KEY)")), credit_cents=0,
                     sources=dict(ok, kubernetes=PODS, polar="not configured (no POLAR_API_KEY)"), **kw)
    assert both.endswith("check again when polar is configured and kubernetes answers.")
    assert next_step(coverage(ev(records=0)), credit_cents=0, sources=ok, **kw).startswith(
        "Next: nothing to credit: i-7f3a has no billing records in 2026-10.")
