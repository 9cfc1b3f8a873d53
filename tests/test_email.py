"""The customer email: the amount actually credited, each finding in the customer's words, and the
invoice the credit appears on."""
import asyncio
import re

from services.cases import CheckRequest
from services.email import compose
from services.investigation import Investigator

from .test_issuing import CONFIG, World, orders, seed

INTERNAL_WORDS = ("duplicate_charge", "stuck_instance", "throttle_", "wrong_tier", "true tier", "rate card", "record #",
                  "piece", "level ")


def worked_report():
    return {"instance_id": "i-7f3a", "true_tier": "small", "periods": ["2026-10"], "credit_by_period": {"2026-10": 1028},
            "findings": [{"kind": "duplicate_charge", "credit_cents": 416, "hours": "2.0000", "summary": "s"},
                         {"kind": "stuck_instance", "credit_cents": 312, "hours": "1.5000", "summary": "s"},
                         {"kind": "wrong_tier", "credit_cents": 300, "hours": "1.5000", "summary": "s"}]}


def issued_case(**kw):
    c = {"id": 7, "method": "refund", "report": worked_report(), "credit_cents": 1028, "proposed_cents": 1028,
         "issued_cents": 1028, "remainder_cents": 0, "periods": ["2026-10"], "ticket_id": "T-1", "instance_id": "i-7f3a"}
    return c | kw


def amounts(text):
    return re.findall(r"\$[\d,]+\.\d\d", text)


def test_findings_in_the_customers_words_with_their_amounts():
    letter = compose(issued_case(), {"name": "Ada Lovelace", "email": "ada@example.com"}, ["re_1"])
    assert letter.to == "ada@example.com" and letter.subject == "Credit Applied - Billing Issue Resolved"
    body = letter.body
    assert "have refunded $10.28 to your original payment method" in body
    assert "- 2 hours of usage were billed more than once: $4.16." in body
    assert ("- 1.5 hours were billed after your instance had stopped, been paused or gone idle, when billing should "
            "have ended: $3.12.") in body
    assert "- 1.5 hours were charged at a higher-priced tier than the small tier your instance runs on: $3.00." in body
    assert "Resolution: we refunded $10.28 of the charges on your invoice for October 2026 usage." in body
    for word in INTERNAL_WORDS:
        assert word not in body, word
    assert "addressed to prevent recurrence" not in body  # the bot cannot know that


def test_an_adjusted_case_states_the_adjusted_amount_only():
    body = compose(issued_case(credit_cents=900, issued_cents=900), None, ["re_1"]).body
    assert set(amounts(body)) == {"$9.00"}  # neither the proposed $10.28 nor findings that add up to it
    assert "Hello there," in body  # Polar did not know the customer: the draft still reads right
    assert "- 2 hours of usage were billed more than once." in body


def test_a_capped_refund_states_what_moved():
    body = compose(issued_case(issued_cents=800, remainder_cents=228), None, ["re_1"]).body
    assert set(amounts(body)) == {"$8.00"}


def test_two_periods_name_each_invoice():
    c = issued_case(credit_cents=1036, proposed_cents=1036, issued_cents=1036, periods=["2026-09", "2026-10"])
    c["report"] = worked_report() | {"periods": ["2026-09", "2026-10"],
                                     "credit_by_period": {"2026-09": 8, "2026-10": 1028}}
    c["report"]["findings"][0] = c["report"]["findings"][0] | {"credit_cents": 424, "hours": "3.0000"}
    body = compose(c, None, ["re_1", "re_2"]).body
    assert "What we found for instance i-7f3a (September 2026 and October 2026 usage):" in body
    assert ("Resolution: we refunded $0.08 on your invoice for September 2026 usage and $10.28 on your invoice for "
            "October 2026 usage.") in body
    assert "that period" not in body
    # lowered, the split follows the amount that moved, as issuing splits it
    body = compose(c | {"credit_cents": 900, "issued_cents": 900}, None, []).body
    assert "we refunded $0.07 on your invoice for September 2026 usage and $8.93 on your invoice for October 2026" in body
    assert "$10.36" not in body and "$10.28" not in body


def test_invoice_credit_appears_on_the_next_invoice():
    body = compose(issued_case(method="invoice_credit", credit_cents=500, issued_cents=500), None, []).body
    assert "have applied a credit of $5.00 to your account" in body
    assert "Resolution: a credit of $5.00 for the usage billed incorrectly in October 2026." in body
    assert "This credit will appear on your next invoice." in body
    assert set(amounts(body)) == {"$5.00"}


def test_an_adjusted_case_issued_in_polar_emails_the_issued_amount(db, db_url, polar):
    """End to end: a case checked on the database, lowered, approved, refunded in our Polar server."""
    seed(db)
    orders(polar)

    async def go():
        async with World(db_url, polar) as w:
            case = (await w.service.open(CheckRequest("i-7f3a", ["2026-10"], "U1", "T-2"))).case
            assert case["credit_cents"] == 1028
            assert (await w.service.adjust(case.id, "U_LEAD", 999)).ok
            assert (await w.service.approve(case.id, "U_LEAD")).ok
            return await w.issuer.issue(case.id), w.rec
    done, rec = asyncio.run(go())
    assert done["state"] == "issued" and done["issued_cents"] == 999
    assert [r["amount"] for r in polar.refunds] == [999]
    letter = compose(done, {"name": "Ada Lovelace", "email": "ada@example.com"}, rec.issued_calls[0][1])
    assert set(amounts(letter.body)) == {"$9.99"}
    assert "we refunded $9.99 of the charges on your invoice for October 2026 usage" in letter.body
