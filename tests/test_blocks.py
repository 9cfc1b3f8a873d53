"""Block Kit builders: valid JSON from the templates, Block Kit's limits held, amounts from the case."""
import json

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


# --- coverage first, and no all-clear without it ------------------------------------------------

COMPLETE = {"state": "complete", "kinds": [], "why": []}
PARTIAL = {"state": "partial", "kinds": ["stuck_instance", "wrong_tier"],
           "why": ["stuck_instance: pod termination and deletion not seen (kubernetes failed: instance pods: HTTP 500)",
                   "wrong_tier: the pod's tier label (the true tier's first source) not read (kubernetes failed: "
                   "instance pods: HTTP 500); the tier used, gpu, may be wrong"]}
NO_RECORDS = {"state": "no_records", "kinds": [], "why": ["no billing records in 2099-01: there is no charge to judge"]}


def nothing_found(coverage):
    c = case("expired")
    c["report"] = report(n_findings=0) | {"credit_cents": 0, "required_level": 0, "periods": ["2099-01"],
                                          "sources": {"database": "ok", "kubernetes": "ok", "polar": "ok"}}
    if coverage is not None:
        c["report"]["coverage"] = coverage
    return c | {"credit_cents": 0, "proposed_cents": 0, "required_level": 0}


def section_texts(msg):
    return [b["text"]["text"] for b in msg["blocks"] if b["type"] == "section" and "text" in b]


def test_coverage_is_the_first_thing_after_the_header():
    c = case()
    c["report"]["coverage"] = PARTIAL
    msg = case_message(c, CONFIG)
    assert msg["blocks"][0]["type"] == "header"
    first = msg["blocks"][1]["text"]["text"]
    assert first.startswith(":warning: Coverage: PARTIAL: not fully judged: stuck_instance, wrong_tier.")
    assert "• stuck_instance: pod termination and deletion not seen" in first
    assert "The credit covers only what could be judged: check again when polar answers before approving" in first
    # a finding of a kind not fully judged says so where it is shown
    assert any(t.startswith("*Billed while stopped, paused or idle (stuck_instance)* — *$2.00*  _(not fully judged)_")
               for t in section_texts(msg))


def test_only_complete_coverage_says_no_wrong_charges_and_checks_out():
    complete = " ".join(section_texts(case_message(nothing_found(COMPLETE), CONFIG)))
    assert "No wrong charges found: every billed hour in 2099-01 checks out." in complete
    assert "Next: nothing to credit: every charge in these periods is right" in complete
    for cov in (PARTIAL, NO_RECORDS, None):
        text = " ".join(section_texts(case_message(nothing_found(cov), CONFIG)))
        assert "checks out" not in text and "every charge in these periods is right" not in text, cov
    partial = " ".join(section_texts(case_message(nothing_found(PARTIAL), CONFIG)))
    assert "not an all-clear" in partial and "do not tell the customer the bill is right" in partial
    none = " ".join(section_texts(case_message(nothing_found(NO_RECORDS), CONFIG)))
    assert ":grey_question: Coverage: no records: no billing records in 2099-01" in none
    assert "Next: nothing to credit: i-7f3a has no billing records in 2099-01." in none
    # a case stored before coverage existed is not an all-clear either
    old = case_message(nothing_found(None), CONFIG)
    assert section_texts(old)[0].startswith(":warning: Coverage: not recorded")


def test_evidence_thread_opens_with_coverage_and_plain_kind_names():
    r = report(n_findings=2) | {"coverage": PARTIAL}
    msgs = evidence_messages(r)
    assert msgs[0].startswith("Coverage: PARTIAL: not fully judged: stuck_instance, wrong_tier.\n• stuck_instance: ")
    assert "*Billed more than once (duplicate_charge)* $1.00 (1 h; records #1-#99)" in msgs[0]
    assert "*Billed while stopped, paused or idle (stuck_instance)* $2.00" in msgs[0]


def test_wrong_charges_credited_before_are_not_an_all_clear():
    c = nothing_found(COMPLETE)
    c["report"]["credited_before"] = [{"case_id": 3, "credit_cents": 208, "kinds": ["duplicate_charge"],
                                       "text": "credited before: $2.08 in case 3"}]
    text = " ".join(section_texts(case_message(c, CONFIG)))
    assert "checks out" not in text
    assert "Nothing left to credit: what was billed wrongly in 2099-01 was credited before." in text
    assert "Next: nothing left to credit: what was billed wrongly was credited before, in the case listed here." in text


def test_before_approval_the_message_says_what_each_order_can_still_refund():
    c = case()
    c["report"] = {**c["report"], "credit_by_period": {"2026-09": 100, "2026-10": 500},
                   "refund_room": {"2026-09": {"invoice": None, "refundable_cents": 0},
                                   "2026-10": {"invoice": "INV-0003", "refundable_cents": 250}}}
    text = str(case_message(c, CONFIG))
    assert "Order INV-0003 (2026-10) can still refund $2.50 of the $5.00" in text
    assert "2026-09 is not invoiced yet" in text
    roomy = case()
    roomy["report"] = {**roomy["report"], "credit_by_period": {"2026-10": 500},
                       "refund_room": {"2026-10": {"invoice": "INV-1", "refundable_cents": 500}}}
    assert "can still refund" not in str(case_message(roomy, CONFIG))
    assert "can still refund" not in str(case_message(c | {"state": "approved"}, CONFIG))


def test_exposure_that_raises_the_level_is_shown():
    c = case() | {"exposure_cents": 4500, "required_level": 2, "customer_id": "c-acme"}
    text = str(case_message(c, CONFIG))
    assert "Needs level 2 (Support lead) for $51.00: this credit plus $45.00" in text


def usage(n_customers=20, reconciled_days=31, id_len=10):
    from decimal import Decimal

    from services.usage_report import UsageLine, UsageReport
    kinds = ["daily_limit", "continuous_limit", "rate_mismatch", "duplicate", "overlap", "billed_after_stop"]
    lines = [UsageLine(customer_id=f"c-<!channel>-{i}-" + "x" * id_len, instances=i % 3 + 1, hours=Decimal("12.5000"),
                       charge_cents=100_000 - i, credits_cents=125, credits=i % 2, watched=i == 3,
                       anomalies={k: {"count": 9999, "overcharge_cents": 123_456} for k in kinds[: i % 7]})
             for i in range(n_customers)]
    return UsageReport(month="2026-10", customers=lines, total_customers=4000, total_hours=Decimal("1234.5000"),
                       total_charge_cents=123_456_789, reconciled_days=reconciled_days, days_in_month=31)


def test_usage_report_message_lists_every_top_customer_within_block_kits_limits():
    from bot.blocks import usage_report_message
    msg = usage_report_message(usage(id_len=4000))
    assert len(msg["blocks"]) <= MAX_BLOCKS
    assert all(len(b["text"]["text"]) <= MAX_TEXT for b in msg["blocks"] if "text" in b)
    assert msg["blocks"][0]["text"]["text"] == "Usage in 2026-10"
    text = json.dumps(msg)
    assert "<!channel>" not in text and "&lt;!channel&gt;" in text  # customer ids are escaped
    small = usage_report_message(usage())
    sections = [b["text"]["text"] for b in small["blocks"] if b["type"] == "section"]
    assert sections[0] == "*4000 customers billed* · 1234.5000 h · $1,234,567.89"
    assert len(sections) == 1 + 20
    assert "Anomalies from 31 of 31 days reconciled" in json.dumps(small["blocks"][2])
    third = sections[1 + 3]
    assert ":eyes: *watchlist*" in third and "Anomalies: daily_limit 9999 ($1,234.56), continuous_limit 9999" in third
    assert "Anomalies: none" in sections[1]  # customer 0: nothing found in the reconciled days


def test_usage_report_message_without_reconciled_days_shows_no_anomaly_lines():
    from bot.blocks import usage_report_message
    msg = usage_report_message(usage(n_customers=2, reconciled_days=0))
    text = json.dumps(msg)
    assert "\\nAnomalies:" not in text and "none can be shown (not: none found)" in text
    empty = usage_report_message(usage(n_customers=0))
    assert "No billing records in the month." in json.dumps(empty)


def _remediate(msg):
    return [e for b in msg["blocks"] if b["type"] == "actions" for e in b["elements"]
            if e["action_id"] == "remediate_plan"]


def test_a_pending_systematic_case_offers_remediate_all_for_its_leading_kind_and_latest_period():
    c = case()
    c["systematic"] = True
    c["report"]["periods"] = ["2026-09", "2026-10"]
    c["report"]["findings"][1]["credit_cents"] = 900  # stuck_instance leads
    [button] = _remediate(case_message(c, CONFIG))
    assert button["value"] == "stuck_instance 2026-10" and button["text"]["text"] == "Remediate all"
    actions = [b for b in case_message(c, CONFIG)["blocks"] if b["type"] == "actions"][0]
    assert [e["action_id"] for e in actions["elements"]][:4] == ["case_approve", "case_approve_other_method",
                                                                 "case_adjust", "case_reject"]
    # equal credits: the first finding leads, as issuing names the case's kind
    c["report"]["findings"][1]["credit_cents"] = 100
    c["report"]["findings"][0]["credit_cents"] = 100
    c["report"]["findings"][2]["credit_cents"] = 100
    assert _remediate(case_message(c, CONFIG))[0]["value"] == "duplicate_charge 2026-10"


def test_remediate_all_is_not_offered_unless_systematic_and_pending():
    assert _remediate(case_message(case(), CONFIG)) == []  # not systematic
    for state in ("approved", "issuing", "issued", "rejected", "failed", "expired"):
        c = case(state)
        c["systematic"] = True
        assert _remediate(case_message(c, CONFIG)) == [], state
    c = case(n_findings=0)
    c["systematic"] = True  # systematic by the control-plane log, nothing to credit: no kind to remediate
    assert _remediate(case_message(c, CONFIG)) == []
