"""A short soak of approve-and-issue with faults at every step; the 200-run one is bench/issue_soak.py."""
import asyncio

from bench.issue_soak import soak


def test_short_soak_issues_every_case_once():
    out = asyncio.run(soak(25, 11))
    assert out["duplicate_refunds"] == 0
    assert out["problems"] == []
    assert out["violations"] == 0, out["violation_texts"]
    assert out["states"] == {"issued": 25}
    assert out["faults"] > 10  # the run really was faulty
