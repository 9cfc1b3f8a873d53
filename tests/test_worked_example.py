"""SPEC 2.3, to the cent."""
from handlers.pipeline import run_case
from services.config import parse_config

from .builders import case, inst, pod, rec


def worked_example():
    records = [rec(1, "10-05 08:00", "10-05 10:00", "4.16"), rec(2, "10-05 08:00", "10-05 10:00", "4.16"),
               rec(3, "10-05 10:00", "10-05 11:00", "2.08")]
    return case(records, instance=inst(heartbeat="10-05 09:00"), pods=[pod("small")])


def test_worked_example_findings_to_the_cent():
    result = run_case(worked_example())
    got = {f.kind: f.credit_cents for f in result.findings}
    assert got == {"duplicate_charge": 416, "stuck_instance": 312, "wrong_tier": 300}
    assert result.credit_cents == 1028
    assert parse_config({}).required_level(result.credit_cents) == 1


def test_worked_example_record_ids_and_evidence():
    result = run_case(worked_example())
    by_kind = {f.kind: f for f in result.findings}
    assert by_kind["duplicate_charge"].record_ids == [2]
    assert by_kind["stuck_instance"].record_ids == [1, 3]
    assert by_kind["wrong_tier"].record_ids == [1]
    assert str(by_kind["wrong_tier"].amount.normalize()) == "2.9955"
    assert any("record #2 duplicates #1" in line for line in by_kind["duplicate_charge"].evidence)
    assert any("idle from 2026-10-05 09:30 UTC" in line for line in by_kind["stuck_instance"].evidence)
    assert result.true_tier == "small"
