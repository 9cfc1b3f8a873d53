"""The billing rules of SPEC 2.2, step by step, to the cent."""
from datetime import timedelta
from decimal import Decimal

import pytest

from handlers.model import PriorCase, PriorCover
from handlers.pipeline import run_case
from handlers.timeline import to_cents
from services.config import Throttle, parse_config

from .builders import case, event, inst, log, pod, rec, t

NO_LIMITS = Throttle(None, None, None)


def credits(result):
    return {f.kind: f.credit_cents for f in result.findings}


def run(records, **kw):
    kw.setdefault("throttle", NO_LIMITS)
    kw.setdefault("pods", [pod("gpu")])
    return run_case(case(records, **kw))


# --- step 1: duplicate_charge ------------------------------------------------------------------

def test_exact_duplicate_is_wholly_duplicate():
    r = run([rec(1, "10-05 08:00", "10-05 10:00"), rec(2, "10-05 08:00", "10-05 10:00")])
    assert credits(r) == {"duplicate_charge": 416}
    assert r.findings[0].record_ids == [2]
    assert r.findings[0].evidence == ["exact duplicate: record #2 duplicates #1, 10-05 08:00–10:00 UTC, 2 h"]


def test_partial_overlap_credits_only_the_overlap_of_the_higher_id():
    r = run([rec(1, "10-05 08:00", "10-05 10:00"), rec(2, "10-05 09:00", "10-05 11:00")])
    assert credits(r) == {"duplicate_charge": 208}
    assert r.findings[0].hours == Decimal(1)


def test_id_order_not_time_order_decides_which_record_is_the_duplicate():
    # record 1 is later in time but has the lower id: record 2's overlapping half is the duplicate
    r = run([rec(1, "10-05 09:00", "10-05 10:00"), rec(2, "10-05 08:00", "10-05 10:00")])
    assert r.findings[0].record_ids == [2]
    assert credits(r) == {"duplicate_charge": 208}


def test_duplicate_covered_by_a_record_of_another_period_is_still_duplicate():
    r = run([rec(1, "10-05 08:00", "10-05 10:00", period="2026-09"), rec(2, "10-05 08:00", "10-05 10:00")])
    assert credits(r) == {"duplicate_charge": 416}


def test_extra_polar_events_credit_the_lowest_id_record_once_per_extra_event():
    records = [rec(5, "10-05 08:00", "10-05 09:00"), rec(6, "10-05 09:00", "10-05 10:00")]
    polar = [event("10-05 08:00", "10-05 09:00", n) for n in range(3)] + [event("10-05 09:00", "10-05 10:00")]
    r = run(records, polar=polar)
    assert credits(r) == {"duplicate_charge": 2 * 208}
    assert r.findings[0].record_ids == [5]
    assert any("3 usage events" in line for line in r.findings[0].evidence)


def test_extra_polar_events_with_duplicate_records_count_only_the_surplus():
    records = [rec(5, "10-05 08:00", "10-05 09:00"), rec(7, "10-05 08:00", "10-05 09:00")]
    polar = [event("10-05 08:00", "10-05 09:00", n) for n in range(3)]
    r = run(records, polar=polar)
    # record 7 duplicates record 5 in the database (208), and one event more than records (208)
    assert credits(r) == {"duplicate_charge": 416}
    assert r.findings[0].record_ids == [5, 7]


def test_record_behind_extra_events_still_goes_through_later_steps():
    records = [rec(5, "10-05 08:00", "10-05 09:00")]
    polar = [event("10-05 08:00", "10-05 09:00", n) for n in range(2)]
    r = run(records, polar=polar, pods=[pod("small")])
    assert credits(r) == {"duplicate_charge": 208, "wrong_tier": to_cents(Decimal("2.08") - Decimal("0.083"))}


def test_polar_unavailable_means_no_event_duplicates_but_database_duplicates_still_found():
    records = [rec(1, "10-05 08:00", "10-05 09:00"), rec(2, "10-05 08:00", "10-05 09:00")]
    assert credits(run(records, polar=None)) == {"duplicate_charge": 208}


# --- step 2: stuck_instance --------------------------------------------------------------------

def test_stop_line_opens_a_window_until_resume():
    records = [rec(i, f"10-05 {h:02d}:00", f"10-05 {h + 1:02d}:00") for i, h in enumerate(range(8, 14), 1)]
    logs = [log("10-05 09:30", "stopping", "alice"), log("10-05 11:00", "resuming")]
    r = run(records, logs=logs)
    # 09:30-11:00 is stuck: 1.5 h of gpu
    assert credits(r) == {"stuck_instance": 312}
    assert r.findings[0].record_ids == [2, 3]


def test_pause_and_reap_windows_never_closed_run_forever():
    records = [rec(1, "10-05 08:00", "10-05 12:00")]
    for kind, detail in [("pausing", "continuous_limit"), ("reaping", ""), ("pausing", "idle")]:
        r = run(records, logs=[log("10-05 10:00", kind, detail)])
        assert credits(r) == {"stuck_instance": 416}, kind


def test_window_opened_before_the_checked_periods_still_counts():
    r = run([rec(1, "10-02 00:00", "10-02 01:00")], logs=[log("09-28 12:00", "stopping", "bob")])
    assert credits(r) == {"stuck_instance": 208}


def test_other_instances_lines_do_not_open_windows():
    r = run([rec(1, "10-02 00:00", "10-02 01:00")], logs=[log("10-01 12:00", "stopping", "bob", instance="i-other")])
    assert credits(r) == {}


def test_pod_termination_or_deletion_opens_a_window_from_the_earliest():
    records = [rec(1, "10-05 08:00", "10-05 12:00")]
    assert credits(run(records, pods=[pod("gpu", terminated="10-05 11:00")])) == {"stuck_instance": 208}
    assert credits(run(records, pods=[pod("gpu", deleted="10-05 10:00")])) == {"stuck_instance": 416}
    both = [pod("gpu", terminated="10-05 11:00", deleted="10-05 09:00")]
    assert credits(run(records, pods=both)) == {"stuck_instance": 624}


def test_stopped_at_counts_only_when_status_is_not_running():
    records = [rec(1, "10-05 08:00", "10-05 12:00")]
    stopped = inst(status="stopped", stopped_at="10-05 10:00")
    running = inst(status="running", stopped_at="10-05 10:00")
    assert credits(run(records, instance=stopped)) == {"stuck_instance": 416}
    assert credits(run(records, instance=running)) == {}


def test_idle_timeout_from_last_heartbeat_and_switched_off():
    records = [rec(1, "10-05 08:00", "10-05 12:00")]
    idle = Throttle(None, None, timedelta(minutes=30))
    r = run(records, instance=inst(heartbeat="10-05 09:30"), throttle=idle)
    assert credits(r) == {"stuck_instance": 416}
    r = run(records, instance=inst(heartbeat="10-05 09:30"), throttle=NO_LIMITS)
    assert credits(r) == {}


# --- step 3: throttle_continuous ---------------------------------------------------------------

def hourly(day, first, last, start_id=1, **kw):
    return [rec(start_id + i, f"{day} {h:02d}:00", f"{day} {h + 1:02d}:00" if h < 23 else f"{day} 23:59:59", **kw)
            for i, h in enumerate(range(first, last))]


def test_continuous_limit_credits_time_after_run_start_plus_limit():
    thr = Throttle(timedelta(hours=8), None, None)
    r = run(hourly("10-05", 6, 20), throttle=thr)  # 14 h
    assert credits(r) == {"throttle_continuous": 6 * 208}
    assert r.findings[0].record_ids == list(range(9, 15))


def test_run_continues_across_a_gap_of_60_seconds_but_not_61():
    thr = Throttle(timedelta(hours=2), None, None)
    within = [rec(1, "10-05 08:00", "10-05 09:30"), rec(2, "10-05 09:31", "10-05 11:00")]
    assert credits(run(within, throttle=thr)) == {"throttle_continuous": to_cents(Decimal("2.08") * Decimal("1"))}
    beyond = [rec(1, "10-05 08:00", "10-05 09:30"), rec(2, "10-05 09:31:01", "10-05 11:00")]
    assert credits(run(beyond, throttle=thr)) == {}


def test_continuous_run_counts_wall_time_and_survives_stuck_gaps_only_if_short():
    thr = Throttle(timedelta(hours=8), None, None)
    records = hourly("10-05", 0, 12)
    logs = [log("10-05 04:00", "pausing", "continuous_limit"), log("10-05 06:00", "resuming")]
    r = run(records, throttle=thr, logs=logs)
    # 04:00-06:00 stuck; the run restarts at 06:00, so 06:00-12:00 (6 h) is under the limit
    assert credits(r) == {"stuck_instance": 416}


def test_continuous_limit_off_when_null():
    assert credits(run(hourly("10-05", 0, 20), throttle=NO_LIMITS)) == {}


def test_run_started_in_the_previous_period_counts_from_its_start():
    thr = Throttle(timedelta(hours=8), None, None)
    records = hourly("09-30", 20, 24, period="2026-09") + hourly("10-01", 0, 8, start_id=10)
    r = run(records, throttle=thr)
    # run from 09-30 20:00, limit reached 10-01 04:00: 04:00-08:00 credited (4 h); 09-30 is out of scope
    assert r.findings[0].kind == "throttle_continuous"
    assert r.findings[0].record_ids == [14, 15, 16, 17]


# --- step 4: throttle_daily --------------------------------------------------------------------

def test_daily_limit_across_instances_of_the_org():
    thr = Throttle(None, timedelta(hours=16), None)
    mine = hourly("10-05", 0, 12)
    other = hourly("10-05", 0, 12, start_id=100, instance="i-other")
    r = run(mine, throttle=thr, org_records=other)
    assert credits(r) == {"throttle_daily": 4 * 208}  # T = 08:00
    assert any("reached its 16h daily limit at 2026-10-05 08:00 UTC" in e for e in r.findings[0].evidence)


def test_daily_limit_with_a_fractional_moment():
    thr = Throttle(None, timedelta(hours=1), None)
    mine = [rec(1, "10-05 00:00", "10-05 01:00")]
    others = [rec(100 + i, "10-05 00:00", "10-05 01:00", instance=f"i-o{i}") for i in range(2)]
    r = run(mine, throttle=thr, org_records=others)
    # three instances at once reach 1 h at 00:20; 40 of 60 minutes of $2.08 = $1.38666... -> 139 cents
    assert credits(r) == {"throttle_daily": 139}
    # seven instances reach 1 h at 00:08:34.285714...: the moment is an exact fraction of a microsecond
    sevens = [rec(100 + i, "10-05 00:00", "10-05 01:00", instance=f"i-o{i}") for i in range(6)]
    r = run(mine, throttle=thr, org_records=sevens)
    assert abs(r.findings[0].amount - Decimal("2.08") * 6 / 7) < Decimal("1e-25")
    assert credits(r) == {"throttle_daily": 178}


def test_daily_limit_dedupes_each_instance_before_summing():
    thr = Throttle(None, timedelta(hours=3), None)
    mine = [rec(1, "10-05 00:00", "10-05 02:00"), rec(2, "10-05 00:00", "10-05 02:00"),
            rec(3, "10-05 02:00", "10-05 04:00")]
    r = run(mine, throttle=thr)
    # billed time 4 h once de-duplicated: limit reached at 03:00, 1 h excess; record 2 is duplicate
    assert credits(r) == {"duplicate_charge": 416, "throttle_daily": 208}


def test_records_crossing_midnight_split_at_midnight():
    thr = Throttle(None, timedelta(hours=2), None)
    r = run([rec(1, "10-05 21:00", "10-06 03:00", "6.00")], throttle=thr)
    # day 1: 21:00-24:00 (limit at 23:00, 1 h excess); day 2: 00:00-03:00 (limit at 02:00, 1 h excess)
    assert credits(r) == {"throttle_daily": 200}


def test_daily_limit_off_when_null():
    other = hourly("10-05", 0, 23, start_id=100, instance="i-other")
    assert credits(run(hourly("10-05", 0, 23), throttle=NO_LIMITS, org_records=other)) == {}


# --- step 5: wrong_tier ------------------------------------------------------------------------

def test_true_tier_precedence_pod_then_creating_line_then_instances():
    records = [rec(1, "10-05 08:00", "10-05 09:00", tier="large")]
    creating = [log("09-01 00:00", "creating", "small", org="o-acme")]
    r = run(records, pods=[pod("medium")], logs=creating, instance=inst(tier="gpu"))
    assert r.true_tier == "medium"
    assert credits(r) == {"wrong_tier": to_cents(Decimal("0.333") - Decimal("0.167"))}
    r = run(records, pods=[pod(None)], logs=creating, instance=inst(tier="gpu"))
    assert r.true_tier == "small"
    r = run(records, pods=[], logs=[], instance=inst(tier="large"))
    assert r.true_tier == "large" and credits(r) == {}


def test_undercharge_is_not_credited_and_is_reported():
    r = run([rec(1, "10-05 08:00", "10-05 18:00", tier="small")], pods=[pod("gpu")])
    assert credits(r) == {}
    assert any("undercharged" in n for n in r.notes)


def test_over_rate_on_the_right_tier_is_credited():
    r = run([rec(1, "10-05 08:00", "10-05 18:00", tier="small", rate="0.1")], pods=[pod("small")])
    assert credits(r) == {"wrong_tier": 17}  # 10 h x (0.100 - 0.083)


def test_unknown_true_tier_skips_pricing_with_a_note():
    r = run([rec(1, "10-05 08:00", "10-05 09:00")], pods=[pod("xlarge")])
    assert credits(r) == {} and any("not on the rate card" in n for n in r.notes)


# --- conventions -------------------------------------------------------------------------------

def test_each_finding_rounds_once_half_up():
    # 3 x $0.0015 of duplicate time would round to 0 each; once summed it is $0.0045 -> 0 cents;
    # a $0.005 duplicate rounds up to 1 cent
    r = run([rec(1, "10-05 08:00", "10-05 09:00", "0.005"), rec(2, "10-05 08:00", "10-05 09:00", "0.005")])
    assert credits(r) == {"duplicate_charge": 1}
    r = run([rec(1, "10-05 08:00", "10-05 09:00", "0.0049"), rec(2, "10-05 08:00", "10-05 09:00", "0.0049")])
    assert credits(r) == {}


def test_thirds_sum_exactly_before_rounding():
    # a $1.00 record a third of which is stuck three times over sums to exactly $1.00 worth of thirds
    records = [rec(1, "10-05 00:00", "10-05 03:00", "0.01")]
    logs = [log("10-05 01:00", "stopping", "x"), log("10-05 02:00", "resuming")]
    r = run(records, logs=logs)
    assert credits(r) == {}  # 1/3 cent rounds to 0
    assert r.findings == []


def test_scope_credits_only_records_of_the_checked_periods():
    records = [rec(1, "09-05 08:00", "09-05 10:00"), rec(2, "09-05 08:00", "09-05 10:00"),
               rec(3, "10-05 08:00", "10-05 10:00"), rec(4, "10-05 08:00", "10-05 10:00")]
    r = run(records, periods=["2026-10"])
    assert credits(r) == {"duplicate_charge": 416} and r.findings[0].record_ids == [4]
    r = run(records, periods=["2026-09", "2026-10"])
    assert credits(r) == {"duplicate_charge": 832}


@pytest.mark.parametrize("cents,level", [(0, 0), (1, 1), (5000, 1), (5001, 2), (50000, 2), (50001, 4),
                                         (10_000_000, 4)])
def test_required_level_bounds(cents, level):
    assert parse_config({}).required_level(cents) == level


def test_required_level_follows_configured_limits():
    cfg = parse_config({"levels": {1: {"limit": "20.00"}, 2: {"limit": "100"}}})
    assert cfg.required_level(2000) == 1 and cfg.required_level(2001) == 2 and cfg.required_level(10001) == 4


def test_prior_credit_is_not_credited_again_and_is_reported():
    records = [rec(1, "10-05 08:00", "10-05 10:00"), rec(2, "10-05 08:00", "10-05 10:00")]
    prior = [PriorCover(case_id=7, record_id=2, start=t("10-05 08:00"), end=t("10-05 09:00"))]
    r = run(records, prior_covers=prior, prior_cases=[PriorCase(7, 208, ("duplicate_charge",), None)])
    assert credits(r) == {"duplicate_charge": 208}
    assert r.credited_before[0]["text"] == "credited before: $2.08 in case 7"


def test_prior_extra_event_credit_is_not_repeated():
    records = [rec(5, "10-05 08:00", "10-05 09:00")]
    polar = [event("10-05 08:00", "10-05 09:00", n) for n in range(2)]
    prior = [PriorCover(3, 5, t("10-05 08:00"), t("10-05 09:00"), extra_events=1)]
    r = run(records, polar=polar, prior_covers=prior, prior_cases=[PriorCase(3, 208, ("duplicate_charge",), None)])
    assert credits(r) == {}
    assert r.credited_before and r.credited_before[0]["case_id"] == 3


# --- systematic (SPEC 2.4) ---------------------------------------------------------------------

def test_failed_pause_in_the_checked_periods_is_systematic():
    records = [rec(1, "10-05 08:00", "10-05 09:00")]
    r = run(records, logs=[log("10-05 08:30", "pause_failed", "context deadline exceeded")])
    assert r.systematic and "throttle failed to pause" in r.systematic_reasons[0]
    r = run(records, logs=[log("09-05 08:30", "reap_failed", "boom")])
    assert not r.systematic


def test_reconciliation_counts_make_a_kind_systematic():
    records = [rec(1, "10-05 08:00", "10-05 10:00"), rec(2, "10-05 08:00", "10-05 10:00")]
    assert run(records, systematic_kinds={"duplicate_charge": 3}).systematic
    assert not run(records, systematic_kinds={"duplicate_charge": 2}).systematic
    assert not run(records, systematic_kinds={"wrong_tier": 9}).systematic


def test_credit_is_split_by_period_to_the_cent():
    records = [rec(1, "09-05 08:00", "09-05 09:00"), rec(2, "09-05 08:00", "09-05 09:00"),
               rec(3, "10-05 08:00", "10-05 10:00"), rec(4, "10-05 08:00", "10-05 10:00")]
    r = run(records, periods=["2026-09", "2026-10"])
    assert r.credit_by_period == {"2026-09": 208, "2026-10": 416}


def test_allocate_sums_exactly_and_is_stable():
    from handlers.timeline import allocate
    assert allocate(100, {"a": Decimal(1), "b": Decimal(1), "c": Decimal(1)}) == {"a": 34, "b": 33, "c": 33}
    assert allocate(0, {"a": Decimal(1)}) == {}
    assert sum(allocate(1001, {"x": Decimal("0.3"), "y": Decimal("0.7")}).values()) == 1001
