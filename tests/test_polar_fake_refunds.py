"""Our Polar server's refunds behave as Polar's: statuses, when the order's amounts move, the
refunds Polar makes on its own, the list filters, and the webhooks each change queues (their
payloads held to the OpenAPI document's webhook schemas by the polar fixture)."""
from datetime import datetime, timezone

import httpx
import pytest

from .fakes import openapi
from .fakes.polar_server import TOKEN

H = {"Authorization": f"Bearer {TOKEN}", "Polar-Version": "2026-04"}


def _order(polar, amount=5000):
    polar.add_customer("c-acme")
    return polar.add_order("c-acme", datetime(2026, 11, 1, 0, 5, tzinfo=timezone.utc), amount)


def _refund(polar, order, amount=1028, case_id="7"):
    r = httpx.post(f"{polar.url}/v1/refunds/", headers=H, json={
        "order_id": order["id"], "amount": amount, "reason": "service_disruption", "metadata": {"case_id": case_id}})
    assert r.status_code == 201, r.text
    return r.json()


def _list(polar, **params):
    r = httpx.get(f"{polar.url}/v1/refunds/", headers=H, params=params)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def test_default_refund_succeeds_at_once_and_moves_the_order(polar):
    order = _order(polar)
    refund = _refund(polar, order)
    assert refund["status"] == "succeeded"
    assert (order["refunded_amount"], order["refundable_amount"], order["status"]) == (1028, 3972, "partially_refunded")
    assert [m.type for m in polar.messages()] == ["order.updated", "refund.created", "order.refunded"]


def test_pending_refund_moves_no_money_until_it_succeeds(polar):
    order = _order(polar)
    polar.next_refund_status = "pending"
    refund = _refund(polar, order)
    assert refund["status"] == "pending" and order["refunded_amount"] == 0 and order["refundable_amount"] == 5000
    assert [m.type for m in polar.messages()] == ["refund.created"]
    settled = polar.settle_refund(refund["id"], "succeeded")
    assert settled["status"] == "succeeded" and settled["modified_at"] is not None
    assert order["refunded_amount"] == 1028 and order["refundable_amount"] == 3972
    assert [m.type for m in polar.messages()] == ["refund.created", "order.updated", "refund.updated", "order.refunded"]
    updated = polar.messages("refund.updated")[0].payload
    assert updated["data"]["status"] == "succeeded" and updated["data"]["metadata"] == {"case_id": "7"}


@pytest.mark.parametrize("outcome", ["failed", "canceled"])
def test_pending_refund_that_fails_leaves_the_order_alone(polar, outcome):
    order = _order(polar)
    polar.next_refund_status = "pending"
    refund = _refund(polar, order)
    polar.settle_refund(refund["id"], outcome)
    assert order["refunded_amount"] == 0 and order["refundable_amount"] == 5000 and order["status"] == "paid"
    assert [m.type for m in polar.messages()] == ["refund.created", "refund.updated"]
    assert polar.messages("refund.updated")[0].payload["data"]["status"] == outcome
    with pytest.raises(AssertionError):  # a failed refund has no later outcome
        polar.settle_refund(refund["id"], "succeeded")


def test_a_succeeded_refund_reverted_gives_the_money_back_to_the_order(polar):
    order = _order(polar)
    refund = _refund(polar, order)
    polar.settle_refund(refund["id"], "failed")
    assert order["refunded_amount"] == 0 and order["refundable_amount"] == 5000
    assert polar.messages()[-1].type == "refund.updated"


def test_queued_statuses_come_first_then_the_default(polar):
    order = _order(polar)
    polar.queue_refund_statuses("pending", "failed")
    assert [_refund(polar, order, 100)["status"] for _ in range(3)] == ["pending", "failed", "succeeded"]


def test_refund_outside_the_bot_has_no_metadata_and_a_prevented_dispute(polar):
    order = _order(polar)
    refund = polar.refund_outside(order["id"])
    assert refund["metadata"] == {} and refund["reason"] == "dispute_prevention" and refund["amount"] == 5000
    assert refund["dispute"]["status"] == "prevented"
    assert order["refundable_amount"] == 0 and order["status"] == "refunded"
    assert [m.type for m in polar.messages()] == ["order.updated", "refund.created", "order.refunded"]
    assert _list(polar, order_id=order["id"])[0]["id"] == refund["id"]


def test_refund_list_filters_by_order_id_and_refund_id_and_succeeded(polar):
    order = _order(polar)
    other = polar.add_order("c-acme", datetime(2026, 12, 1, tzinfo=timezone.utc), 900)
    polar.queue_refund_statuses("pending")
    a, b, c = _refund(polar, order, 100), _refund(polar, order, 200), _refund(polar, other, 300)
    assert [r["id"] for r in _list(polar, order_id=order["id"])] == [a["id"], b["id"]]
    assert [r["id"] for r in _list(polar, id=c["id"])] == [c["id"]]
    assert [r["id"] for r in _list(polar, id=[a["id"], c["id"]])] == [a["id"], c["id"]]
    assert [r["id"] for r in _list(polar, order_id=order["id"], succeeded="true")] == [b["id"]]
    assert _list(polar, id="00000000-0000-4000-8000-000000000000") == []


def test_every_queued_webhook_payload_matches_the_documents_schema(polar):
    order = _order(polar)
    polar.queue_refund_statuses("pending")
    polar.settle_refund(_refund(polar, order)["id"], "succeeded")
    polar.refund_outside(order["id"])
    assert {m.type for m in polar.messages()} == {"refund.created", "refund.updated", "order.updated", "order.refunded"}
    for m in polar.messages():  # the fixture also asserts polar.violations == [] at the end
        assert openapi.webhook_errors(m.type, m.payload) == []


def test_the_webhook_schema_check_catches_a_payload_off_the_document():
    errors = openapi.webhook_errors("refund.updated", {"type": "refund.updated", "timestamp": "x",
                                                       "data": {"id": "r", "status": "refunded"}})
    assert any("status" in e for e in errors) and any("'amount' is a required property" in e for e in errors)
    assert openapi.webhook_errors("refund.disputed", {}) == [
        "webhook type 'refund.disputed' is not in the OpenAPI subset (scripts/extract_polar_subset.py)"]
