"""Invariants of the rules over random cases (hypothesis)."""
import random
from collections import defaultdict
from datetime import timedelta
from decimal import Decimal

from hypothesis import HealthCheck, given, settings, strategies as st

from handlers.model import Record, UsageEvent
from handlers.pipeline import run_case
from handlers.timeline import HOUR_US, US
from services.config import Throttle

from .builders import case, inst, log, pod, t

BASE = t("10-01 00:00")
TIERS = ["small", "medium", "large", "gpu"]


@st.composite
def cases(draw):
    n = draw(st.integers(1, 25))
    records = []
    for i in range(n):
        start = BASE + draw(st.integers(-3 * 24 * 60, 5 * 24 * 60)) * 60 * US
        length = draw(st.integers(1, 30 * 60)) * 60 * US
        tier = draw(st.sampled_from(TIERS))
        cents = draw(st.integers(0, 5000))
        start_period = "2026-09" if start < BASE else "2026-10"
        records.append(Record(id=draw(st.integers(1, 10_000)) * 100 + i, instance_id="i-7f3a", org_id="o-acme",
                              customer_id="c-acme", tier=tier, rate_per_hour=Decimal("2.08"),
                              hours_used=Decimal(length) / HOUR_US, total_charge=Decimal(cents) / 100,
                              billing_period=start_period, start=start, end=start + length))
    others = []
    for i in range(draw(st.integers(0, 6))):
        start = BASE + draw(st.integers(0, 5 * 24 * 60)) * 60 * US
        length = draw(st.integers(1, 20 * 60)) * 60 * US
        others.append(Record(id=900_000 + i, instance_id=f"i-o{i % 3}", org_id="o-acme", customer_id="c-acme",
                             tier="gpu", rate_per_hour=Decimal("2.08"), hours_used=Decimal(length) / HOUR_US,
                             total_charge=Decimal("1"), billing_period="2026-10", start=start, end=start + length))
    logs = []
    for _ in range(draw(st.integers(0, 4))):
        at = f"10-0{draw(st.integers(1, 5))} {draw(st.integers(0, 23)):02d}:{draw(st.integers(0, 59)):02d}"
        logs.append(log(at, draw(st.sampled_from(["stopping", "pausing", "resuming", "reaping"])), "x"))
    dur = st.one_of(st.none(), st.integers(1, 30).map(lambda h: timedelta(hours=h)))
    throttle = Throttle(draw(dur), draw(dur), draw(st.one_of(st.none(), st.just(timedelta(minutes=30)))))
    heartbeat = draw(st.one_of(st.none(), st.sampled_from(["10-02 12:00", "10-04 00:00"])))
    # metering events for some records, each sent twice: one extra event per chosen record
    polar = [UsageEvent(f"e{i}{copy}", r.instance_id, r.start, r.end, r.id)
             for i, r in enumerate(draw(st.lists(st.sampled_from(records), max_size=4))) for copy in "ab"]
    return dict(records=records, org=others, logs=logs, throttle=throttle, heartbeat=heartbeat,
                tier=draw(st.sampled_from(TIERS)), polar=polar)


def build(c, order=None):
    records = list(c["records"])
    if order is not None:
        order.shuffle(records)
    return case(records, instance=inst(heartbeat=c["heartbeat"]), throttle=c["throttle"], pods=[pod(c["tier"])],
                logs=c["logs"], polar=c["polar"], org_records=c["org"])


COMMON = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@COMMON
@given(cases())
def test_no_billed_second_is_credited_twice(c):
    result = run_case(build(c))
    spans = defaultdict(list)
    for cov in result.covered:
        if not cov["extra_events"]:
            spans[cov["record_id"]].append((cov["start"], cov["end"]))
    for rid, ss in spans.items():
        ss.sort()
        for (a0, a1), (b0, b1) in zip(ss, ss[1:]):
            assert a1 <= b0, f"record {rid}: {a0}-{a1} overlaps {b0}-{b1}"


@COMMON
@given(cases())
def test_credit_never_exceeds_what_was_charged(c):
    result = run_case(build(c))
    by_id = {r.id: r for r in c["records"]}
    charged = sum(r.total_charge for r in c["records"] if r.billing_period in ("2026-10",))
    extra = sum(by_id[cov["record_id"]].total_charge * cov["extra_events"] for cov in result.covered)
    database_credit = sum(f.amount for f in result.findings) - extra
    assert database_credit <= charged + Decimal("1e-20")
    for f in result.findings:
        assert f.credit_cents >= 1
        covered_charge = sum(by_id[i].total_charge for i in f.record_ids)
        extra_k = sum(by_id[cov["record_id"]].total_charge * cov["extra_events"]
                      for cov in result.covered if cov["kind"] == f.kind)
        assert f.amount <= covered_charge + extra_k + Decimal("1e-20")


@COMMON
@given(cases())
def test_findings_sum_to_the_credit(c):
    result = run_case(build(c))
    assert result.credit_cents == sum(f.credit_cents for f in result.findings)
    assert sum(result.credit_by_period.values()) == result.credit_cents
    assert len({f.kind for f in result.findings}) == len(result.findings)


@COMMON
@given(cases(), st.integers(0, 2**32))
def test_result_does_not_depend_on_record_order(c, seed):
    a = run_case(build(c))
    b = run_case(build(c, random.Random(seed)))
    assert [(f.kind, f.credit_cents, f.record_ids, f.hours) for f in a.findings] == \
           [(f.kind, f.credit_cents, f.record_ids, f.hours) for f in b.findings]
