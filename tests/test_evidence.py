"""The evidence people read: one line per stretch of time with the same reason, exact duplicates
told apart from partial overlaps, money in dollars and cents, rates as the card states them."""
import re
from datetime import timedelta
from decimal import Decimal

from handlers.pipeline import id_ranges, run_case
from services.config import Throttle

from .builders import case, event, inst, pod, rec

NO_LIMITS = Throttle(None, None, None)


def hourly(first_id, day, n, **kw):
    """n hourly records from 00:00 of 10-<day>, ids first_id, first_id + 1, ..."""
    out = []
    for h in range(n):
        d, hh = divmod(h, 24)
        d2, hh2 = divmod(h + 1, 24)
        out.append(rec(first_id + h, f"10-{day + d:02d} {hh:02d}:00", f"10-{day + d2:02d} {hh2:02d}:00", **kw))
    return out


def by_kind(result):
    return {f.kind: f for f in result.findings}


def test_a_day_of_hourly_records_after_the_pod_ended_is_one_line():
    records = hourly(1001, 5, 24, tier="small")
    r = run_case(case(records, throttle=NO_LIMITS, pods=[pod("small", terminated="10-04 23:10", name="i-7f3a-0")]))
    stuck = by_kind(r)["stuck_instance"]
    assert stuck.evidence == ["records #1001-#1024, 10-05 00:00–24:00 UTC, 24 h: pod i-7f3a-0 terminated 2026-10-04 23:10 UTC"]
    assert stuck.record_ids == list(range(1001, 1025))  # the JSON keeps every id
    assert stuck.credit_cents == 199  # 24 x $0.083 = $1.992
    assert stuck.summary == "24 h billed after the instance had stopped, been paused or gone idle: $1.99"


def test_a_gap_starts_a_new_line_and_long_cases_say_how_much_is_left_out():
    records = [rec(100 + d, f"10-{d + 1:02d} 08:00", f"10-{d + 1:02d} 09:00", tier="small") for d in range(20)]
    r = run_case(case(records, throttle=NO_LIMITS, pods=[pod("small", deleted="09-30 00:00", name="p")]))
    lines = by_kind(r)["stuck_instance"].evidence
    assert len(lines) == 13
    assert lines[0] == "record #100, 10-01 08:00–09:00 UTC, 1 h: pod p deleted 2026-09-30 00:00 UTC"
    assert lines[-1] == "…and 8 more stretches (8 h, records #112-#119)"
    assert by_kind(r)["stuck_instance"].record_ids == list(range(100, 120))


def test_exact_duplicates_and_partial_overlaps_are_told_apart():
    records = [rec(1, "10-05 08:00", "10-05 10:00"), rec(2, "10-05 09:00", "10-05 11:00"),
               rec(3, "10-05 08:00", "10-05 10:00")]
    polar = [event("10-05 08:00", "10-05 10:00", n) for n in range(4)]
    dup = by_kind(run_case(case(records, throttle=NO_LIMITS, pods=[pod("gpu")], polar=polar)))["duplicate_charge"]
    assert dup.evidence == [
        "extra metering: Polar has 4 usage events for 10-05 08:00–10:00 UTC but the database has 2 records: "
        "2 extra charges of record #1",
        "exact duplicate: record #3 duplicates #1, 10-05 08:00–10:00 UTC, 2 h",
        "partial overlap: record #2 (billed 10-05 09:00–11:00 UTC) overlaps #1, 10-05 09:00–10:00 UTC, 1 h",
    ]
    assert dup.summary == ("7 h billed more than once (2 h in exact duplicate records; 1 h in records overlapping "
                           "earlier ones; 2 extra metering events in Polar): $14.56")
    assert dup.credit_cents == 1456 and dup.record_ids == [1, 2, 3]


def test_a_day_of_duplicated_hourly_records_is_one_line():
    records = hourly(1001, 5, 24) + hourly(1025, 5, 24)
    dup = by_kind(run_case(case(records, throttle=NO_LIMITS, pods=[pod("gpu")])))["duplicate_charge"]
    assert dup.evidence == ["exact duplicates: records #1025-#1048 duplicate #1001-#1024, 10-05 00:00–24:00 UTC, 24 h"]
    assert dup.record_ids == list(range(1025, 1049)) and dup.credit_cents == 4992


def test_money_is_dollars_and_cents_and_rates_are_as_the_card_states_them():
    # the database stores numeric(10,4): 2.0800 is shown as the card's $2.08/h, 0.0830 as $0.083/h
    records = [rec(1, "10-05 08:00", "10-05 09:00", "2.0800", rate="2.0800"),
               rec(2, "10-05 09:00", "10-05 10:00", "0.3330", tier="large", rate="0.3330")]
    r = run_case(case(records, throttle=NO_LIMITS, instance=inst(tier="small"), pods=[pod("small")]))
    tier = by_kind(r)["wrong_tier"]
    assert tier.summary == ("2 h charged as gpu ($2.08/h), large ($0.333/h) although the instance is small ($0.083/h): "
                            "$2.25 overcharged")
    assert tier.evidence[0] == "true tier small (pod i-7f3a-pod label tier=small): $0.083/h on the rate card"
    assert "record #1, 10-05 08:00–09:00 UTC, 1 h: billed as gpu at $2.08/h; small costs $0.083/h" in tier.evidence
    text = " ".join([tier.summary, *tier.evidence])
    for amount in re.findall(r"\$[\d,]+\.\d+(?:/h)?", text):
        assert amount.endswith("/h") or re.fullmatch(r"\$[\d,]+\.\d\d", amount), amount
    assert tier.amount == Decimal("2.0800") + Decimal("0.3330") - 2 * Decimal("0.083")


def test_throttle_evidence_says_when_the_instance_should_have_been_paused():
    records = hourly(1, 5, 10, tier="small")
    r = run_case(case(records, throttle=Throttle(timedelta(hours=8), None, None), pods=[pod("small")]))
    cont = by_kind(r)["throttle_continuous"]
    assert cont.evidence == ["records #9-#10, 10-05 08:00–10:00 UTC, 2 h: running without a pause since "
                             "2026-10-05 00:00 UTC: the 8h continuous limit was reached at 2026-10-05 08:00 UTC, "
                             "when it should have been paused"]


def test_id_ranges():
    assert id_ranges([3]) == "record #3"
    assert id_ranges([1, 2, 3, 5]) == "records #1-#3, #5"
    assert id_ranges(list(range(1, 20, 2))) == "records #1, #3, #5, #7, …, #19 (10 records)"
    assert id_ranges([4, 5], bare=True) == "#4-#5"


def test_extra_metering_lines_name_only_what_this_check_credits():
    from handlers.model import PriorCase, PriorCover

    from .builders import t
    records = [rec(5, "10-05 08:00", "10-05 09:00"), rec(6, "09-30 08:00", "09-30 09:00")]  # #6 is September's
    polar = ([event("10-05 08:00", "10-05 09:00", n) for n in range(3)]
             + [event("09-30 08:00", "09-30 09:00", n) for n in range(2)])
    prior = [PriorCover(3, 5, t("10-05 08:00"), t("10-05 09:00"), extra_events=1)]
    r = run_case(case(records, throttle=NO_LIMITS, pods=[pod("gpu")], polar=polar, prior_covers=prior,
                      prior_cases=[PriorCase(3, 208, ("duplicate_charge",), None)]))
    dup = by_kind(r)["duplicate_charge"]
    assert dup.credit_cents == 208  # one of the two extra events; the other was credited by case 3
    assert dup.evidence == ["extra metering: Polar has 3 usage events for 10-05 08:00–09:00 UTC but the database has "
                            "1 record: 2 extra charges of record #5 (1 credited before)"]
    assert dup.summary == "1 h billed more than once (1 extra metering event in Polar): $2.08"
