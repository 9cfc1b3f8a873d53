"""services/polar.py's refund reads (all pages, one refund by id, a case's events) and what
Polar's refusals and refund statuses mean to a support agent, from Polar's own error bodies."""
import asyncio
from datetime import datetime, timezone

import httpx
import pytest

from services.polar import (PolarClient, PolarError, PolarNotFound, _error, refund_failure_reason,
                            refund_status_reason)

from .fakes import openapi
from .fakes.polar_server import TOKEN


def _order(polar, amount=500_000):
    polar.add_customer("c-acme")
    return polar.add_order("c-acme", datetime(2026, 11, 1, 0, 5, tzinfo=timezone.utc), amount)


def _client(polar):
    return PolarClient(polar.url, TOKEN, backoff=0.01)


def run(coro_fn, polar):
    async def go():
        client = _client(polar)
        try:
            return await coro_fn(client)
        finally:
            await client.close()
    return asyncio.run(go())


def test_refunds_for_order_reads_every_page(polar):
    order, other = _order(polar), _order(polar)
    made = [polar.add_refund(order, 10, "succeeded", {"case_id": str(i)}, "duplicate")["id"] for i in range(250)]
    polar.add_refund(other, 10, "succeeded", {}, "duplicate")
    got = run(lambda c: c.refunds_for_order(order["id"]), polar)
    assert sorted(r["id"] for r in got) == sorted(made)
    pages = sorted(r.q("page") for r in polar.server.requests if r.path == "/v1/refunds/")
    assert pages == ["1", "2", "3"]
    assert {r.q("limit") for r in polar.server.requests} == {"100"}


def test_refund_by_id_and_not_found(polar):
    order = _order(polar)
    a = polar.add_refund(order, 100, "pending", {"case_id": "1"}, "duplicate")
    polar.add_refund(order, 200, "pending", {"case_id": "2"}, "duplicate")
    polar.settle_refund(a["id"], "failed")
    got = run(lambda c: c.refund(a["id"]), polar)
    assert (got["id"], got["status"], got["amount"]) == (a["id"], "failed", 100)
    assert polar.server.requests[-1].query["id"] == [a["id"]]
    with pytest.raises(PolarNotFound):
        run(lambda c: c.refund("00000000-0000-4000-8000-000000000000"), polar)


def test_events_with_metadata_finds_a_cases_events(polar):
    polar.add_customer("c-acme")
    polar.add_usage_event("c-acme", "compute_hours", {"case_id": "7", "hours": -1.5})
    polar.add_usage_event("c-acme", "compute_hours", {"case_id": "8", "hours": -2})
    polar.add_usage_event("c-acme", "other_meter", {"case_id": "7"})
    got = run(lambda c: c.events_with_metadata("c-acme", "compute_hours", "case_id", "7"), polar)
    assert [e["metadata"]["hours"] for e in got] == [-1.5]


# --- refusals --------------------------------------------------------------------------------------

def _refusal(status, body) -> PolarError:
    """The PolarError the client raises for this answer (services.polar._error parses it)."""
    return _error(httpx.Response(status, json=body))


# The bodies the OpenAPI document gives POST /v1/refunds/: 403 RefundedAlready (description "Order
# is already fully refunded.") and 422 HTTPValidationError; each is checked against the document.
REFUNDED_ALREADY = {"error": "RefundedAlready", "detail": "Order is already fully refunded."}
EXCEEDS_422 = {"detail": [{"loc": ["body", "amount"], "msg": "Amount exceeds refundable amount", "type": "value_error"}]}
BAD_REASON_422 = {"detail": [{"loc": ["body", "reason"], "type": "enum",
                              "msg": "Input should be 'duplicate', 'fraudulent', 'customer_request', "
                                     "'service_disruption', 'satisfaction_guarantee' or 'other'"}]}
# Polar's server answers these too (server/polar/refund/service.py), though the document lists neither.
REFUNDS_BLOCKED = {"error": "RefundsBlocked", "detail": "Refunds are blocked for order: 6a0c5b0e-0d5e-4a3c-9a53-6f1b1b1f6a10"}
AMOUNT_TOO_HIGH_400 = {"error": "RefundAmountTooHigh", "detail": "Refund amount exceeds remaining order balance: 500"}


def test_the_documented_bodies_are_the_documents():
    assert openapi.response_errors("/v1/refunds/", "post", 403, REFUNDED_ALREADY) == []
    assert openapi.response_errors("/v1/refunds/", "post", 422, EXCEEDS_422) == []
    assert openapi.response_errors("/v1/refunds/", "post", 422, BAD_REASON_422) == []
    # the dispute's 403 is not the documented 403 body, and 400 is not documented at all
    assert openapi.response_errors("/v1/refunds/", "post", 403, REFUNDS_BLOCKED) != []
    assert openapi.response_errors("/v1/refunds/", "post", 400, AMOUNT_TOO_HIGH_400) == [
        "status 400 is not documented for POST /v1/refunds/"]


def test_already_fully_refunded():
    text = refund_failure_reason(_refusal(403, REFUNDED_ALREADY))
    assert text.startswith("Polar says this order is already fully refunded")
    assert "nothing was refunded" in text and "Next:" in text and "invoice credit" in text


def test_disputed_payment():
    text = refund_failure_reason(_refusal(403, REFUNDS_BLOCKED))
    assert "customer disputed the payment" in text and "do not retry" in text
    assert "settle the dispute" in text and "not paid twice" in text


@pytest.mark.parametrize("status,body,left", [(422, EXCEEDS_422, ""),
                                              (400, AMOUNT_TOO_HIGH_400, " (Polar says $5.00 is left on it)")])
def test_exceeds_the_refundable_amount(status, body, left):
    assert refund_failure_reason(_refusal(status, body)) == (
        f"The credit is more than this order can still refund{left}; nothing was refunded. Next: refund at most "
        "what the order can still take and issue the rest as invoice credit, or lower the credit.")


def test_other_refusals_say_what_polar_said_and_what_to_do():
    text = refund_failure_reason(_refusal(422, BAD_REASON_422))
    assert "reason: Input should be 'duplicate'" in text and "fault in the bot" in text and "do not retry" in text
    text = refund_failure_reason(_refusal(403, {"error": "Forbidden", "detail": "insufficient_scope"}))
    assert "403 Forbidden: insufficient_scope" in text and "refunds:write" in text
    text = refund_failure_reason(_refusal(404, {"error": "ResourceNotFound", "detail": "Order not found"}))
    assert "does not know this order (Order not found)" in text
    text = refund_failure_reason(PolarError(409, "Conflict", "busy"))
    assert "(409 Conflict: busy)" in text and "retry later" in text


def test_refusals_through_our_polar_server(polar):
    """The same words for what our Polar answers a real POST: a second full refund, and too much."""
    order = _order(polar, amount=1000)

    async def go(client):
        body = {"order_id": order["id"], "reason": "duplicate", "metadata": {"case_id": "1"}}
        with pytest.raises(PolarError) as too_much:
            await client.create_refund({**body, "amount": 1001})
        await client.create_refund({**body, "amount": 1000})
        with pytest.raises(PolarError) as again:
            await client.create_refund({**body, "amount": 1})
        return too_much.value, again.value

    too_much, again = run(go, polar)
    assert too_much.status == 422 and refund_failure_reason(too_much).startswith("The credit is more than")
    assert again.status == 403 and refund_failure_reason(again).startswith("Polar says this order is already fully")


@pytest.mark.parametrize("status,words", [
    ("succeeded", "Polar refunded $10.28 on order o-1: the money went back"),
    ("pending", "Refund pending: Polar accepted the refund of $10.28 on order o-1, but the money has not moved"),
    ("failed", "Polar reports the refund of $10.28 on order o-1 failed"),
    ("canceled", "Polar reports the refund of $10.28 on order o-1 was canceled before any money moved"),
    ("refunded?", "as 'refunded?', which the bot does not know")])
def test_refund_status_reason(status, words):
    text = refund_status_reason(status, 1028, "o-1")
    assert words in text
    assert ("invoice credit" in text) == (status in ("failed", "canceled"))
