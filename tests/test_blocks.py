"""Block Kit builders: valid JSON from the templates, Block Kit's limits held, amounts from the case."""
from bot.blocks import MAX_BLOCKS, MAX_TEXT, case_message, enforce_limits, evidence_messages
from services.config import parse_config

CONFIG = parse_config({})


def report(n_findings=3, evidence_len=50, n_evidence=3):
    kinds = ["duplicate_charge", "stuck_instance", "throttle_continuous", "throttle_daily", "wrong_tier"]
    return {"instance_id": "i-7f3a", "org_id": "o-acme", "customer_id": "c-acme", "periods": ["2026-10"],
            "findings": [{"kind": kinds[i % 5], "credit_cents": 100 * (i + 1), "hours": "1.0000",
                          "summary": "s \"quoted\" <&>", "evidence": ["e" * evidence_len] * n_evidence,
                          "record_ids": list(range(1, 100))} for i in range(n_findings)],
            "credit_cents": 600, "required_level": 1, "systematic": False, "true_tier": "small",
            "sources": {"database": "ok", "kubernetes": "ok", "polar": "failed: timed out"},
            "credited_before": [], "notes": ["undercharged by $0.10"], "systematic_reasons": []}


def case(state="pending", **kw):
    c = {"id": 42, "state": state, "method": "refund", "report": report(**kw), "credit_cents": 600, "proposed_cents": 600,
         "required_level": 1, "systematic": False, "ticket_id": "T-9", "requested_by": "U1", "decided_by": "U2",
         "reason": None, "issued_cents": None}
    return c


def test_pending_case_has_buttons_carrying_only_the_case_id():
    msg = case_message(case(), CONFIG)
    actions = [b for b in msg["blocks"] if b["type"] == "actions"][0]
    assert [e["action_id"] for e in actions["elements"]] == ["case_approve", "case_approve_other_method",
                                                             "case_adjust", "case_reject"]
    assert {e["value"] for e in actions["elements"]} == {"42"}
    assert actions["elements"][0]["text"]["text"] == "Approve $6.00 (refund)"
    assert actions["elements"][1]["text"]["text"] == "Approve as invoice credit"
    text = str(msg)
    assert "failed: timed out" in text and "level 1 (Support agent)" in text and "ticket T-9" in text


def test_decided_case_has_no_buttons_and_says_who():
    msg = case_message(case("rejected") | {"reason": "customer error"}, CONFIG)
    assert not [b for b in msg["blocks"] if b["type"] == "actions"]
    assert "Rejected by <@U2>: customer error" in str(msg)


def test_limits_hold_for_huge_cases():
    msg = case_message(case(n_findings=5, evidence_len=5000), CONFIG)
    for b in msg["blocks"]:
        if "text" in b and isinstance(b["text"], dict):
            assert len(b["text"]["text"]) <= MAX_TEXT
    many = {"blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "x"}} for _ in range(80)]
            + [{"type": "actions", "elements": []}]}
    out = enforce_limits(many)
    assert len(out["blocks"]) == MAX_BLOCKS and out["blocks"][-1]["type"] == "actions"
    assert "…and 32 more blocks" in out["blocks"][-2]["elements"][0]["text"]


def test_evidence_thread_is_split_under_the_text_limit():
    msgs = evidence_messages(report(n_findings=5, evidence_len=900, n_evidence=10))
    assert len(msgs) > 1 and all(len(m) <= MAX_TEXT for m in msgs)
    assert "undercharged by $0.10" in msgs[-1]


def test_lowered_amount_is_shown_against_the_proposal():
    c = case() | {"credit_cents": 400}
    assert "(lowered from $6.00)" in str(case_message(c, CONFIG))
