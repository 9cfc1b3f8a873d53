"""The bot's own books (handlers/books.py): every claimed credit is money Polar confirms, every
refund Polar made for a bot case belongs to an issued case."""
import itertools
import random
from decimal import Decimal

from hypothesis import given, settings, strategies as st

from handlers.books import correction_case_id, credit_cents, credit_mismatches

KEYS = {"kind", "case_id", "instance_id", "org_id", "customer_id", "record_ids", "overcharge_cents",
        "claimed_cents", "confirmed_cents", "detail"}


def case(cid, issued=1028, method="refund", issuances=None, state="issued"):
    if issuances is None:
        issuances = [{"method": "refund", "target": f"o-{cid}", "amount_cents": issued, "state": "confirmed",
                      "polar_ref": f"r-{cid}"}]
    return {"id": cid, "customer_id": "c-acme", "instance_id": "i-7f3a", "org_id": "o-acme", "state": state,
            "issued_cents": issued, "method": method, "polar_reference": f"r-{cid}", "issuances": issuances}


def row(rid, cid, dollars="10.28", notes=None):
    return {"id": rid, "customer_id": "c-acme", "credit_amount": Decimal(dollars),
            "notes": notes if notes is not None else f"billing-bot case {cid} (i-7f3a, 2026-10); method refund; ..."}


def refund(rid, cid, amount=1028, status="succeeded", order=None):
    metadata = {} if cid is None else {"case_id": str(cid), "period": "2026-10"}
    return {"id": rid, "order_id": order or f"o-{cid}", "status": status, "amount": amount, "metadata": metadata}


def check(corrections=(), cases=(), refunds=(), ingested=None, **kw):
    out = credit_mismatches(list(corrections), list(cases), list(refunds), ingested or {}, **kw)
    for a in out:
        assert set(a) == KEYS and a["kind"] == "credit_mismatch" and a["overcharge_cents"] == 0
    return out


def test_a_refund_that_succeeded_for_the_claimed_amount_is_in_the_books():
    assert check([row(1, 7)], [case(7)], [refund("r-7", 7)]) == []


def test_refunds_on_two_orders_add_up():
    c = case(7, issued=1500, issuances=[
        {"method": "refund", "target": "o-a", "amount_cents": 1000, "state": "confirmed", "polar_ref": "r-a"},
        {"method": "refund", "target": "o-b", "amount_cents": 500, "state": "confirmed", "polar_ref": "r-b"}])
    assert check([row(1, 7, "15.00")], [c], [refund("r-a", 7, 1000, order="o-a"), refund("r-b", 7, 500, order="o-b")]) == []


def test_a_pending_refund_is_not_money():
    [a] = check([row(1, 7)], [case(7)], [refund("r-7", 7, status="pending")])
    assert (a["case_id"], a["claimed_cents"], a["confirmed_cents"]) == (7, 1028, 0)
    assert a["detail"] == "billing_corrections says $10.28, Polar confirms $0.00; not money: refund r-7 pending $10.28"
    assert (a["customer_id"], a["instance_id"], a["org_id"], a["record_ids"]) == ("c-acme", "i-7f3a", "o-acme", [])


def test_failed_canceled_and_reverted_refunds_are_not_money():
    for status in ("failed", "canceled"):
        [a] = check([row(1, 7)], [case(7)], [refund("r-7", 7, status=status)])
        assert a["confirmed_cents"] == 0 and f"refund r-7 {status} $10.28" in a["detail"]


def test_part_succeeded_part_pending():
    [a] = check([row(1, 7)], [case(7)], [refund("r-1", 7, 500), refund("r-2", 7, 528, status="pending")])
    assert (a["claimed_cents"], a["confirmed_cents"]) == (1028, 500)
    assert "Polar confirms $5.00" in a["detail"] and "refund r-2 pending $5.28" in a["detail"]


def test_the_claimed_amount_differs_from_polars():
    [a] = check([row(1, 7, "10.28")], [case(7)], [refund("r-7", 7, 1000)])
    assert a["detail"].startswith("billing_corrections says $10.28, Polar confirms $10.00")


def test_an_issued_case_without_its_row():
    [a] = check([], [case(7)], [refund("r-7", 7)])
    assert a["detail"] == "issued, but no billing_corrections row"
    [a] = check([], [case(7)], [])
    assert a["detail"] == "issued, but no billing_corrections row; the case says $10.28 issued"


def test_two_rows_for_one_case():
    [a] = check([row(1, 7, "5.14"), row(2, 7, "5.14")], [case(7)], [refund("r-7", 7)])
    assert a["detail"] == "2 billing_corrections rows (1, 2) for one case" and a["claimed_cents"] == 1028


def test_the_case_disagrees_with_its_row_and_polar():
    [a] = check([row(1, 7)], [case(7, issued=999)], [refund("r-7", 7)])
    assert a["detail"] == "the case says $9.99 issued"


def _invoice(cid, cents=1028, state="confirmed"):
    return case(cid, issued=cents, method="invoice_credit", issuances=[
        {"method": "invoice_credit", "target": f"billing-bot-case-{cid}", "amount_cents": cents, "state": state,
         "polar_ref": "3 usage events"}])


def test_invoice_credit_with_its_events_in_polar():
    events = [{"id": "e1", "metadata": {"case_id": "8", "hours": -1.5}}]
    assert check([row(1, 8)], [_invoice(8)], [], {8: events}) == []


def test_invoice_credit_without_events_in_polar():
    [a] = check([row(1, 8)], [_invoice(8)], [], {8: []})
    assert a["confirmed_cents"] == 0 and "invoice credit of $10.28 recorded, but Polar has no usage events" in a["detail"]
    [b] = check([row(1, 8)], [_invoice(8)], [], {})  # not read is not confirmed
    assert b["detail"] == a["detail"]


def test_invoice_credit_never_confirmed_is_not_money():
    [a] = check([row(1, 8)], [_invoice(8, state="intent")], [], {8: [{"id": "e1"}]})
    assert a["confirmed_cents"] == 0


def test_a_method_switch_part_refund_part_invoice_credit():
    c = case(9, issued=1028, issuances=[
        {"method": "refund", "target": "o-9", "amount_cents": 500, "state": "confirmed", "polar_ref": "r-9"},
        {"method": "invoice_credit", "target": "billing-bot-case-9", "amount_cents": 528, "state": "confirmed",
         "polar_ref": "2 usage events"}])
    assert check([row(1, 9)], [c], [refund("r-9", 9, 500)], {9: [{"id": "e"}]}) == []
    [a] = check([row(1, 9)], [c], [refund("r-9", 9, 500)], {9: []})
    assert a["confirmed_cents"] == 500


def test_money_polar_moved_for_a_case_that_is_not_issued():
    [a] = check([], [], [refund("r-5", 5)], known_cases={5: "failed"})
    assert (a["case_id"], a["claimed_cents"], a["confirmed_cents"]) == (5, 0, 1028)
    assert a["detail"] == ("Polar refunded $10.28 (refund r-5, order o-5) for case 5, which is failed: money moved "
                           "that no issued case accounts for")
    [b] = check([], [], [refund("r-6", 6)])
    assert "for case 6, which is not a case the bot knows" in b["detail"]
    [c] = check([], [], [refund("r-x", "abc", order="o-1")])
    assert c["case_id"] == "abc" and "for case abc, which is not a case the bot knows" in c["detail"]


def test_a_refund_of_a_case_issued_another_day_is_fine_here():
    assert check([row(1, 7)], [case(7)], [refund("r-7", 7), refund("r-3", 3, 200, order="o-7")],
                 known_cases={3: "issued"}) == []


def test_a_pending_refund_for_a_closed_case_is_flagged_but_not_for_an_open_one():
    [a] = check([], [], [refund("r-5", 5, status="pending")], known_cases={5: "failed"})
    assert "is pending for case 5, which is failed: it may still move money" in a["detail"]
    for state in ("issuing", "approved"):
        assert check([], [], [refund("r-5", 5, status="pending")], known_cases={5: state}) == []
    assert check([], [], [refund("r-5", 5, status="failed")], known_cases={5: "failed"}) == []


def test_polars_own_refunds_and_peoples_rows_are_not_the_bots_to_judge():
    assert check([row(1, 7), row(2, None, "99.00", notes="refunded by hand, ticket T-9")], [case(7)],
                 [refund("r-7", 7), refund("r-p", None, 5000, order="o-7")]) == []


def test_a_row_for_a_case_that_was_not_issued():
    [a] = check([row(1, 4)], [], [], known_cases={4: "failed"})
    assert a["case_id"] == 4 and a["claimed_cents"] == 1028
    assert a["detail"] == "billing_corrections row 1 claims $10.28 for case 4, which is failed, not issued that day"
    [b] = check([row(1, 4)], [case(4, state="issuing")], [])
    assert "which is issuing, not issued that day" in b["detail"]


def test_the_same_refund_listed_twice_counts_once():
    assert check([row(1, 7)], [case(7)], [refund("r-7", 7), refund("r-7", 7)]) == []


def test_correction_case_id_and_credit_cents():
    assert correction_case_id("billing-bot case 12 (i-7f3a, 2026-10); method refund") == 12
    assert [correction_case_id(n) for n in ["billing-bot case 12x", "case 12", "", None]] == [None] * 4
    assert [credit_cents(v) for v in [Decimal("10.28"), Decimal("0.10"), "3", 0, Decimal("1234567890.99")]] == [
        1028, 10, 300, 0, 123456789099]


def test_the_answer_does_not_depend_on_the_order_of_the_inputs():
    rows = [row(1, 7), row(2, 8), row(3, 4)]
    cases = [case(7), _invoice(8)]
    refunds = [refund("r-7", 7, status="pending"), refund("r-5", 5), refund("r-7b", 7, 100)]
    expected = check(rows, cases, refunds, {8: []}, known_cases={5: "rejected", 4: "failed"})
    assert len(expected) == 4
    rnd = random.Random(13)
    for _ in range(20):
        r, c, f = rows[:], cases[:], refunds[:]
        rnd.shuffle(r), rnd.shuffle(c), rnd.shuffle(f)
        assert check(r, c, f, {8: []}, known_cases={5: "rejected", 4: "failed"}) == expected


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(1, 100_000), min_size=1, max_size=3), min_size=1, max_size=6),
       st.data())
def test_books_that_agree_have_no_mismatch_and_one_wrong_cent_is_found(amounts, data):
    cases, rows, refunds = [], [], []
    for cid, parts in enumerate(amounts, start=1):
        total = sum(parts)
        cases.append(case(cid, issued=total))
        rows.append(row(cid, cid, str(Decimal(total) / 100)))
        refunds += [refund(f"r-{cid}-{i}", cid, p, order=f"o-{cid}-{i}") for i, p in enumerate(parts)]
    assert check(rows, cases, refunds) == []
    wrong = data.draw(st.integers(0, len(rows) - 1))
    delta = data.draw(st.sampled_from([-1, 1]))
    bad = dict(rows[wrong], credit_amount=rows[wrong]["credit_amount"] + Decimal(delta) / 100)
    out = check(rows[:wrong] + [bad] + rows[wrong + 1:], cases, refunds)
    assert [a["case_id"] for a in out] == [wrong + 1]
    assert out[0]["claimed_cents"] - out[0]["confirmed_cents"] == delta
