"""The pure aggregation of a remediation plan (handlers/remediation.py): on random sets of
per-instance checks, the plan's customers, cents, hours and total are the sums of the instances'
findings of that kind, other kinds are counted per customer and never credited, the JSON and CSV
say the same, and the fingerprint binds exactly the customers, instances and cents."""
import csv
import io
from decimal import Decimal

import pytest
from hypothesis import given, settings, strategies as st

from handlers.model import KINDS
from handlers.remediation import InstanceFindings, build_plan
from handlers.timeline import hours_text

hours = st.decimals(min_value=Decimal("0.0001"), max_value=Decimal("500"), places=4)
finding = st.tuples(st.integers(min_value=1, max_value=500_000), hours)
check = st.builds(lambda cust, n, kinds: (f"c-{cust}", n, kinds),
                  st.integers(0, 6), st.integers(0, 10_000),
                  st.dictionaries(st.sampled_from(KINDS), finding, max_size=5))


def instances(raw):
    seen, out = set(), []
    for cust, n, kinds in raw:
        iid = f"i-{n}"
        if iid in seen:
            continue
        seen.add(iid)
        out.append(InstanceFindings(cust, iid, kinds))
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(check, max_size=40), st.sampled_from(KINDS), st.randoms())
def test_the_plan_is_the_sum_of_the_instances_findings_of_its_kind(raw, kind, rnd):
    checks = instances(raw)
    plan = build_plan(kind, "2026-10", checks)
    want: dict[str, list] = {}
    for c in checks:
        if kind in c.kinds:
            want.setdefault(c.customer_id, []).append(c)
    assert {line.customer_id for line in plan.customers} == set(want)
    for line in plan.customers:
        mine = want[line.customer_id]
        assert line.credit_cents == sum(c.kinds[kind][0] for c in mine)
        assert line.hours == sum(c.kinds[kind][1] for c in mine)
        assert line.instance_ids == tuple(sorted(c.instance_id for c in mine))
    assert plan.total_cents == sum(c.kinds[kind][0] for c in checks if kind in c.kinds)
    assert plan.instances_checked == len(checks)
    # the largest first
    assert [line.credit_cents for line in plan.customers] == sorted((line.credit_cents for line in plan.customers),
                                                                    reverse=True)
    # other kinds: how many customers had each, this kind never among them
    for k in KINDS:
        customers = {c.customer_id for c in checks if k in c.kinds}
        if k == kind or not customers:
            assert k not in plan.other_kinds
        else:
            assert plan.other_kinds[k] == len(customers)
    # the order the checks finished in changes nothing, fingerprint included
    shuffled = list(checks)
    rnd.shuffle(shuffled)
    assert build_plan(kind, "2026-10", shuffled) == plan
    # JSON and CSV say the same
    js = plan.as_json(required_level=2)
    assert list(js) == ["kind", "period", "customers", "total_cents", "required_level", "other_kinds"]
    assert js["total_cents"] == sum(c["credit_cents"] for c in js["customers"])
    rows = list(csv.DictReader(io.StringIO(plan.as_csv())))
    assert [(r["customer_id"], r["instance_ids"].split(" "), r["hours"], int(r["credit_cents"])) for r in rows] == [
        (c["customer_id"], c["instance_ids"], c["hours"], c["credit_cents"]) for c in js["customers"]]


@settings(max_examples=200, deadline=None)
@given(st.lists(check, min_size=1, max_size=20), st.sampled_from(KINDS))
def test_the_fingerprint_changes_with_any_customer_instance_or_cent(raw, kind):
    checks = instances(raw)
    plan = build_plan(kind, "2026-10", checks)
    credited = [c for c in checks if kind in c.kinds]
    if not credited:
        assert plan.customers == () and plan.total_cents == 0
        return
    first = credited[0]
    cents, h = first.kinds[kind]
    more = InstanceFindings(first.customer_id, first.instance_id, {**first.kinds, kind: (cents + 1, h)})
    assert build_plan(kind, "2026-10", [more if c is first else c for c in checks]).fingerprint != plan.fingerprint
    moved = InstanceFindings(first.customer_id + "x", first.instance_id, first.kinds)
    assert build_plan(kind, "2026-10", [moved if c is first else c for c in checks]).fingerprint != plan.fingerprint
    assert build_plan(kind, "2026-11", checks).fingerprint != plan.fingerprint
    # hours explain, they do not move money: the same cents bind the same approval
    longer = InstanceFindings(first.customer_id, first.instance_id, {**first.kinds, kind: (cents, h + 1)})
    assert build_plan(kind, "2026-10", [longer if c is first else c for c in checks]).fingerprint == plan.fingerprint


def test_a_worked_plan():
    checks = [InstanceFindings("c-b", "i-2", {"stuck_instance": (250, Decimal("1.5")), "wrong_tier": (10, Decimal(1))}),
              InstanceFindings("c-a", "i-1", {"stuck_instance": (100, Decimal("0.33333333333"))}),
              InstanceFindings("c-b", "i-3", {"stuck_instance": (50, Decimal("0.5"))}),
              InstanceFindings("c-c", "i-4", {"duplicate_charge": (7, Decimal(1))}),
              InstanceFindings("c-d", "i-5", {}),
              InstanceFindings("c-e", "i-6", {}, held_by=((9, "pending", ("stuck_instance",)),
                                                           (10, "issued", ("wrong_tier",))))]
    plan = build_plan("stuck_instance", "2026-10", checks)
    assert plan.held == (("c-e", "i-6", 9, "pending"),)  # named, not credited; case 10 held another kind
    assert plan.as_json(1) == {
        "kind": "stuck_instance", "period": "2026-10",
        "customers": [{"customer_id": "c-b", "instance_ids": ["i-2", "i-3"], "hours": "2.0000", "credit_cents": 300},
                      {"customer_id": "c-a", "instance_ids": ["i-1"], "hours": "0.3333", "credit_cents": 100}],
        "total_cents": 400, "required_level": 1, "other_kinds": {"duplicate_charge": 1, "wrong_tier": 1}}
    assert plan.as_csv() == ("customer_id,instance_ids,hours,credit_cents\n"
                             "c-b,i-2 i-3,2.0000,300\nc-a,i-1,0.3333,100\n")
    assert len(plan.fingerprint) == 64 and plan.instance_count == 3 and plan.instances_checked == 6
    assert hours_text(plan.hours) == "2.3333"


@pytest.mark.parametrize("checks, kind, words", [
    ([], "refund_everything", "unknown finding kind"),
    ([InstanceFindings("c", "i-1", {}), InstanceFindings("c", "i-1", {})], "wrong_tier", "appears twice"),
    ([InstanceFindings("c", "i-1", {"bogus": (1, Decimal(1))})], "wrong_tier", "unknown finding kind 'bogus'"),
    ([InstanceFindings("c", "i-1", {"wrong_tier": (-5, Decimal(1))})], "wrong_tier", "negative credit"),
])
def test_bad_checks_are_refused(checks, kind, words):
    with pytest.raises(ValueError, match=words):
        build_plan(kind, "2026-10", checks)


def test_a_batch_is_settled_only_when_every_customer_and_remainder_is_decided():
    from handlers.remediation import BatchCase, batch_progress

    def case(i, cust, state, cents=100, issued=0, parent=None):
        return BatchCase(i, cust, state, cents, issued, None, 0, remainder_of=parent)

    base = [case(1, "c-1", "issued", issued=100), case(2, "c-2", "issued", issued=60)]
    # c-2's order took $0.60 of $1.00: the rest waits as invoice credit in its own case
    waiting = batch_progress(["c-1", "c-2"], base + [case(3, "c-2", "pending", cents=40, parent=2)])
    assert waiting.done and not waiting.settled and [c.case_id for c in waiting.waiting] == [3]
    assert waiting.issued == 2 and waiting.issued_cents == 160 and waiting.customers == 2
    issuing = batch_progress(["c-1", "c-2"], base + [case(3, "c-2", "approved", cents=40, parent=2)])
    assert not issuing.done and issuing.issuing == 1
    settled = batch_progress(["c-1", "c-2"], base + [case(3, "c-2", "issued", cents=40, issued=40, parent=2)])
    assert settled.settled and settled.issued == 2 and settled.issued_cents == 200
    assert settled.headline() == "2 of 2 issued ($2.00)"
    opening = batch_progress(["c-1", "c-2", "c-3"], base)
    assert not opening.done and opening.not_opened == 1 and "1 being opened" in opening.headline()
