"""Polar's webhooks: the Standard Webhooks check as Polar's SDK makes it, the typed events, and
`POST /polar/webhooks` served by aiohttp on a real port, fed by our Polar server's sender (good,
duplicate, forged, old timestamp, unsigned, unknown type), with the deliveries table in a real
PostgreSQL."""
import asyncio
import base64
import hashlib
import hmac
import json
import logging
from datetime import datetime, timedelta, timezone

import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from services import polar_webhooks as pw
from services.db import Database
from services.store import Store
from services.store import WebhookDeliveries

from .fakes.polar_server import WEBHOOK_SECRET, sign

NOW = datetime(2026, 11, 3, 12, 0, tzinfo=timezone.utc)


def _order(polar, amount=5000):
    polar.add_customer("c-acme")
    return polar.add_order("c-acme", datetime(2026, 11, 1, 0, 5, tzinfo=timezone.utc), amount)


def _refund_message(polar, status="pending", case_id="42"):
    order = _order(polar)
    refund = polar.add_refund(order, 1028, status, {"case_id": case_id, "period": "2026-10"})
    return polar.messages("refund.created")[-1], refund, order


def _headers(msg, secret=WEBHOOK_SECRET, when=NOW):
    return {"webhook-id": msg.id, "webhook-timestamp": str(int(when.timestamp())),
            "webhook-signature": sign(secret, msg.id, when, msg.body)}


# --- verify --------------------------------------------------------------------------------------

def test_verify_accepts_polars_signature_and_returns_the_payload(polar):
    msg, refund, _ = _refund_message(polar)
    payload = pw.verify(WEBHOOK_SECRET, _headers(msg), msg.body.encode(), NOW)
    assert payload == msg.payload and payload["data"]["id"] == refund["id"]


def test_the_hmac_key_is_the_secrets_utf8_bytes(polar):
    """Computed by hand, without the package: HMAC-SHA256 keyed by the secret's UTF-8 bytes over
    "id.timestamp.body", base64, "v1," in front: what Polar sends."""
    msg, _, _ = _refund_message(polar)
    stamp = str(int(NOW.timestamp()))
    mac = hmac.new(WEBHOOK_SECRET.encode(), f"{msg.id}.{stamp}.{msg.body}".encode(), hashlib.sha256).digest()
    headers = {"webhook-id": msg.id, "webhook-timestamp": stamp,
               "webhook-signature": "v1," + base64.b64encode(mac).decode()}
    assert headers["webhook-signature"] == _headers(msg)["webhook-signature"]
    assert pw.verify(WEBHOOK_SECRET, headers, msg.body, NOW)["type"] == "refund.created"
    # the raw secret used as if it were already base64 (a common mistake) is another key
    with pytest.raises(pw.Rejected, match="no matching signature"):
        pw.verify(WEBHOOK_SECRET, {**headers, "webhook-signature": Webhook(WEBHOOK_SECRET).sign(
            msg.id, NOW, msg.body)}, msg.body, NOW)


def test_a_delivery_we_accept_passes_polars_sdk_check_too(polar):
    """polar_sdk.webhooks.validate_event is Webhook(base64(secret)).verify(body, headers): the same
    delivery, stamped now, passes it."""
    msg, _, _ = _refund_message(polar)
    now = datetime.now(timezone.utc)
    headers = _headers(msg, when=now)
    assert Webhook(base64.b64encode(WEBHOOK_SECRET.encode()).decode()).verify(msg.body, headers) == msg.payload
    assert pw.verify(WEBHOOK_SECRET, headers, msg.body) == msg.payload  # now defaults to the clock


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_verify_refuses_a_missing_header(polar, missing):
    msg, _, _ = _refund_message(polar)
    headers = {k: v for k, v in _headers(msg).items() if k != missing}
    with pytest.raises(pw.Rejected, match="missing webhook-id, webhook-timestamp or webhook-signature"):
        pw.verify(WEBHOOK_SECRET, headers, msg.body, NOW)


@pytest.mark.parametrize("offset,reason", [(timedelta(minutes=-5, seconds=-1), "too old"),
                                           (timedelta(hours=-3), "too old"),
                                           (timedelta(minutes=5, seconds=1), "too new")])
def test_verify_refuses_a_timestamp_out_of_the_window_even_when_signed(polar, offset, reason):
    msg, _, _ = _refund_message(polar)
    with pytest.raises(pw.Rejected, match=reason):
        pw.verify(WEBHOOK_SECRET, _headers(msg, when=NOW + offset), msg.body, NOW)


@pytest.mark.parametrize("offset", [timedelta(minutes=-5), timedelta(0), timedelta(minutes=5)])
def test_verify_accepts_the_edges_of_the_window(polar, offset):
    msg, _, _ = _refund_message(polar)
    assert pw.verify(WEBHOOK_SECRET, _headers(msg, when=NOW + offset), msg.body, NOW)["type"] == "refund.created"


def test_verify_refuses_forged_tampered_and_garbled_signatures(polar):
    msg, _, _ = _refund_message(polar)
    with pytest.raises(pw.Rejected, match="no matching signature"):
        pw.verify(WEBHOOK_SECRET, _headers(msg, secret="polar_whs_someone_else"), msg.body, NOW)
    with pytest.raises(pw.Rejected, match="no matching signature"):  # body changed after signing
        pw.verify(WEBHOOK_SECRET, _headers(msg), msg.body.replace("1028", "9999"), NOW)
    with pytest.raises(pw.Rejected, match="no matching signature"):  # signature of another message id
        pw.verify(WEBHOOK_SECRET, {**_headers(msg), "webhook-id": "msg_other"}, msg.body, NOW)
    for garbage in ["v1", "v1,", "v1,@@@not-base64@@@", "nocomma", "v2," + _headers(msg)["webhook-signature"][3:]]:
        with pytest.raises(pw.Rejected, match="no matching signature"):
            pw.verify(WEBHOOK_SECRET, {**_headers(msg), "webhook-signature": garbage}, msg.body, NOW)
    with pytest.raises(pw.Rejected, match="not a Unix time"):
        pw.verify(WEBHOOK_SECRET, {**_headers(msg), "webhook-timestamp": "yesterday"}, msg.body, NOW)


def test_verify_accepts_any_matching_v1_signature_among_several(polar):
    """Standard Webhooks: several space-separated signatures during a secret rotation."""
    msg, _, _ = _refund_message(polar)
    good = _headers(msg)["webhook-signature"]
    header = f"v1a,xyz v1,{base64.b64encode(b'x' * 32).decode()} {good}"
    assert pw.verify(WEBHOOK_SECRET, {**_headers(msg), "webhook-signature": header}, msg.body, NOW)


def test_verify_refuses_a_signed_body_that_is_not_a_json_object():
    for body in ["not json", "[1, 2]"]:
        headers = {"webhook-id": "msg_1", "webhook-timestamp": str(int(NOW.timestamp())),
                   "webhook-signature": sign(WEBHOOK_SECRET, "msg_1", NOW, body)}
        with pytest.raises(pw.Rejected, match="body is not"):
            pw.verify(WEBHOOK_SECRET, headers, body, NOW)


def test_verify_without_a_secret_refuses_everything(polar):
    msg, _, _ = _refund_message(polar)
    with pytest.raises(pw.Rejected, match="no webhook secret configured"):
        pw.verify("", _headers(msg), msg.body, NOW)


# --- parse ---------------------------------------------------------------------------------------

def test_parse_refund_created_by_the_bot(polar):
    msg, refund, order = _refund_message(polar, status="pending")
    ev = pw.parse(msg.payload)
    assert ev == pw.RefundUpdate(
        event_type="refund.created", refund_id=refund["id"], order_id=order["id"], status="pending",
        amount_cents=1028, tax_amount_cents=0, currency="usd", reason="service_disruption", case_id="42",
        customer_id=order["customer_id"], created_at=refund["created_at"], modified_at=None, dispute_status=None,
        metadata={"case_id": "42", "period": "2026-10"})
    assert ev.by_bot and not ev.final
    with pytest.raises(TypeError):  # the metadata of a frozen event cannot be changed either
        ev.metadata["case_id"] = "43"


@pytest.mark.parametrize("outcome", ["succeeded", "failed", "canceled"])
def test_parse_refund_updated_outcomes(polar, outcome):
    _, refund, _ = _refund_message(polar, status="pending")
    polar.settle_refund(refund["id"], outcome)
    ev = pw.parse(polar.messages("refund.updated")[-1].payload)
    assert (ev.event_type, ev.status, ev.final, ev.case_id, ev.amount_cents) == ("refund.updated", outcome, True, "42", 1028)
    assert ev.modified_at is not None


def test_parse_a_refund_polar_made_on_its_own(polar):
    order = _order(polar)
    polar.refund_outside(order["id"], 700)
    ev = pw.parse(polar.messages("refund.created")[-1].payload)
    assert ev.case_id is None and not ev.by_bot and ev.metadata == {}
    assert (ev.reason, ev.dispute_status, ev.status, ev.amount_cents) == ("dispute_prevention", "prevented", "succeeded", 700)


def test_parse_order_refunded(polar):
    order = _order(polar)
    polar.refund_outside(order["id"], 700)
    ev = pw.parse(polar.messages("order.refunded")[-1].payload)
    assert ev == pw.OrderRefunded(order_id=order["id"], customer_id=order["customer_id"], external_customer_id="c-acme",
                                  status="partially_refunded", total_amount_cents=5000, refunded_amount_cents=700,
                                  refundable_amount_cents=4300, currency="usd")


def test_parse_other_types_are_unknown(polar):
    order = _order(polar)
    assert pw.parse(polar.message("order.updated", order).payload) == pw.Unknown("order.updated")
    assert pw.parse({"type": "refund.disputed", "data": {}}) == pw.Unknown("refund.disputed")
    assert pw.parse({}) == pw.Unknown("")


def test_parse_refuses_a_known_type_without_its_fields(polar):
    msg, _, _ = _refund_message(polar)
    payload = msg.payload
    del payload["data"]["amount"]
    with pytest.raises(pw.Malformed, match="no 'amount'"):
        pw.parse(payload)
    payload = msg.payload
    payload["data"]["amount"] = 10.28  # dollars where Polar sends cents
    with pytest.raises(pw.Malformed, match="not integer cents"):
        pw.parse(payload)
    with pytest.raises(pw.Malformed, match="data is not an object"):
        pw.parse({"type": "order.refunded", "data": None})


# --- the endpoint, served --------------------------------------------------------------------------

class Sink:
    """on_event and an in-memory `seen`, recording what the handler did."""

    def __init__(self, fail_times=0):
        self.events, self.ids, self.fail_times = [], {}, fail_times

    async def on_event(self, event, webhook_id):
        if self.fail_times:
            self.fail_times -= 1
            raise RuntimeError("database went away")
        self.events.append((webhook_id, event))

    async def seen(self, webhook_id, event_type):
        if webhook_id in self.ids:
            return False
        self.ids[webhook_id] = event_type
        return True

    async def forget(self, webhook_id):
        self.ids.pop(webhook_id, None)


async def _serve(handler):
    app = web.Application()
    app.router.add_post("/polar/webhooks", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/polar/webhooks"


def served(polar, sink, secret=WEBHOOK_SECRET, forget=True):
    """Run `scenario(send)` with the handler on a real port; send(msg, how) is our Polar's sender,
    run in a thread as Polar's workers are."""
    def go(scenario):
        async def main():
            runner, url = await _serve(pw.make_handler(secret, sink.on_event, sink.seen,
                                                       sink.forget if forget else None))
            polar.webhook_endpoint(url, WEBHOOK_SECRET)
            try:
                async def send(msg, how="signed"):
                    return await asyncio.to_thread(polar.send, msg, how=how)
                return await scenario(send)
            finally:
                await runner.cleanup()
        return asyncio.run(main())
    return go


def test_endpoint_good_duplicate_forged_old_unsigned_and_unknown(polar, caplog):
    msg, refund, order = _refund_message(polar, status="pending")
    sink = Sink()

    async def scenario(send):
        forged = await send(msg, "forged")
        old = await send(msg, "old")
        unsigned = await send(msg, "unsigned")
        assert (forged.status, old.status, unsigned.status) == (401, 401, 401)
        assert sink.events == [] and sink.ids == {}  # refused deliveries change nothing
        good = await send(msg)
        again = await send(msg)  # Polar's retry: same webhook-id, new timestamp and signature
        unknown = await send(polar.message("order.updated", order))
        return forged, old, unsigned, good, again, unknown

    with caplog.at_level(logging.DEBUG):
        forged, old, unsigned, good, again, unknown = served(polar, sink)(scenario)
    assert json.loads(forged.body) == {"error": "no matching signature"}
    assert json.loads(old.body) == {"error": "webhook-timestamp too old"}
    assert json.loads(unsigned.body) == {"error": "missing webhook-id, webhook-timestamp or webhook-signature header"}
    assert (good.status, json.loads(good.body)) == (200, {"status": "ok"})
    assert (again.status, json.loads(again.body)) == (200, {"status": "duplicate"})
    assert (unknown.status, json.loads(unknown.body)) == (200, {"status": "ignored", "type": "order.updated"})
    assert [(wid, ev.refund_id, ev.status) for wid, ev in sink.events] == [(msg.id, refund["id"], "pending")]
    assert sink.ids == {msg.id: "refund.created"}
    assert WEBHOOK_SECRET not in caplog.text and "v1," not in caplog.text  # no secret, no signature in the logs


def test_endpoint_hands_over_outcomes_and_orders_in_polars_order(polar):
    _, refund, _ = _refund_message(polar, status="pending")
    polar.settle_refund(refund["id"], "succeeded")
    sink = Sink()

    async def scenario(send):
        return [await send(m) for m in polar.messages()]

    answers = served(polar, sink)(scenario)
    assert [a.status for a in answers] == [200] * 4
    assert [type(ev).__name__ for _, ev in sink.events] == ["RefundUpdate", "RefundUpdate", "OrderRefunded"]
    assert [getattr(ev, "status") for _, ev in sink.events] == ["pending", "succeeded", "partially_refunded"]


def test_endpoint_without_a_secret_refuses_even_polars_own_delivery(polar):
    msg, _, _ = _refund_message(polar)
    sink = Sink()

    async def scenario(send):
        return await send(msg)

    answer = served(polar, sink, secret=None)(scenario)
    assert answer.status == 401 and json.loads(answer.body) == {"error": "no webhook secret configured"}
    assert sink.events == [] and sink.ids == {}


def test_a_failed_handling_is_retried_by_polar_and_then_taken(polar):
    msg, refund, _ = _refund_message(polar)
    sink = Sink(fail_times=1)

    async def scenario(send):
        return await send(msg), await send(msg)

    first, retry = served(polar, sink)(scenario)
    assert first.status == 500 and retry.status == 200 and json.loads(retry.body) == {"status": "ok"}
    assert [ev.refund_id for _, ev in sink.events] == [refund["id"]]


def test_a_signed_but_unreadable_payload_is_400_and_not_recorded(polar):
    _, refund, _ = _refund_message(polar)
    bad = polar.message("refund.updated", {**refund, "status": "pending"})
    # keep the document happy in our fake, then break the signed text the way a bug upstream would
    broken = type(bad)(bad.id, bad.type, bad.body.replace('"amount": 1028', '"amount": "1028"'))
    sink = Sink()

    async def scenario(send):
        return await send(broken)

    answer = served(polar, sink)(scenario)
    assert answer.status == 400 and "not integer cents" in json.loads(answer.body)["error"]
    assert sink.events == [] and sink.ids == {}


def test_endpoint_refuses_a_body_too_large_unread(polar):
    sink = Sink()

    async def main():
        import httpx
        runner, url = await _serve(pw.make_handler(WEBHOOK_SECRET, sink.on_event, sink.seen))
        try:
            async with httpx.AsyncClient() as client:
                return await client.post(url, content=b"{" + b" " * pw.MAX_BODY_BYTES + b"}")
        finally:
            await runner.cleanup()

    assert asyncio.run(main()).status_code == 413 and sink.ids == {}


# --- the deliveries table --------------------------------------------------------------------------

def test_deliveries_table_first_time_once_even_at_once(db_url):
    async def main():
        db = await Database.connect(db_url)
        try:
            assert "020_polar_webhooks.sql" in await Store(db).migrate()
            d = WebhookDeliveries(db)
            firsts = await asyncio.gather(*(d.first_time("msg_a", "refund.updated") for _ in range(8)))
            again = await d.first_time("msg_a", "refund.updated")
            other = await d.first_time("msg_b")
            await d.forget("msg_a")
            after_forget = await d.first_time("msg_a", "refund.updated")
            async with db.pool.connection() as conn:
                rows = await (await conn.execute(
                    "SELECT webhook_id, event_type, received_at IS NOT NULL AS stamped"
                    " FROM billing_bot.polar_webhook_deliveries ORDER BY webhook_id")).fetchall()
            return firsts, again, other, after_forget, rows
        finally:
            await db.close()

    firsts, again, other, after_forget, rows = asyncio.run(main())
    assert sorted(firsts) == [False] * 7 + [True] and again is False and other is True and after_forget is True
    assert rows == [{"webhook_id": "msg_a", "event_type": "refund.updated", "stamped": True},
                    {"webhook_id": "msg_b", "event_type": None, "stamped": True}]


def test_endpoint_with_the_real_deliveries_table(db_url, polar):
    """The handler as the bot will wire it: seen and forget are the table's."""
    msg, refund, order = _refund_message(polar, status="pending")
    events = []

    async def on_event(event, webhook_id):
        events.append((webhook_id, event.refund_id))

    async def main():
        db = await Database.connect(db_url)
        await Store(db).migrate()
        d = WebhookDeliveries(db)
        runner, url = await _serve(pw.make_handler(WEBHOOK_SECRET, on_event, d.first_time, d.forget))
        polar.webhook_endpoint(url, WEBHOOK_SECRET)
        try:
            statuses = []
            for m, how in [(msg, "forged"), (msg, "old"), (msg, "signed"), (msg, "signed"),
                           (polar.message("order.updated", order), "signed")]:
                statuses.append((await asyncio.to_thread(polar.send, m, how=how)).status)
            async with db.pool.connection() as conn:
                rows = await (await conn.execute(
                    "SELECT webhook_id, event_type FROM billing_bot.polar_webhook_deliveries")).fetchall()
            return statuses, rows
        finally:
            await runner.cleanup()
            await db.close()

    statuses, rows = asyncio.run(main())
    assert statuses == [401, 401, 200, 200, 200]
    assert events == [(msg.id, refund["id"])]
    assert rows == [{"webhook_id": msg.id, "event_type": "refund.created"}]
    assert [d.how for d in polar.deliveries] == ["forged", "old", "signed", "signed", "signed"]


def test_fake_polar_delivers_queued_webhooks_by_itself(polar):
    """auto_deliver: Polar's webhooks arrive while the test only drives refunds."""
    order = _order(polar)
    polar.next_refund_status = "pending"
    sink = Sink()

    async def main():
        runner, url = await _serve(pw.make_handler(WEBHOOK_SECRET, sink.on_event, sink.seen, sink.forget))
        polar.webhook_endpoint(url, WEBHOOK_SECRET, auto_deliver=True)
        try:
            refund = await asyncio.to_thread(polar.add_refund, order, 300, "pending", {"case_id": "9"}, "duplicate")
            await asyncio.to_thread(polar.settle_refund, refund["id"], "failed")
            for _ in range(200):
                if len(polar.deliveries) == 2:
                    break
                await asyncio.sleep(0.02)
        finally:
            await runner.cleanup()

    asyncio.run(main())
    assert [(ev.event_type, ev.status) for _, ev in sink.events] == [("refund.created", "pending"),
                                                                    ("refund.updated", "failed")]


def test_a_whsec_prefixed_secret_is_still_the_hmac_key_whole(polar):
    """Polar shows secrets like `whsec_...`. Its SDK hands base64 of the whole string to the
    signer, so the key is every byte of it, prefix included; Webhook(secret) used directly would
    strip `whsec_` and base64-decode the rest: another key, which must not verify."""
    secret = "whsec_ovyN6cPrTv56AApvzCaJno08SSmGJmgbWilb33N2JuK"
    msg, _, _ = _refund_message(polar)
    stamp = str(int(NOW.timestamp()))
    mac = hmac.new(secret.encode(), f"{msg.id}.{stamp}.{msg.body}".encode(), hashlib.sha256).digest()
    headers = {"webhook-id": msg.id, "webhook-timestamp": stamp, "webhook-signature": "v1," + base64.b64encode(mac).decode()}
    assert pw.verify(secret, headers, msg.body, NOW)["type"] == "refund.created"
    assert _headers(msg, secret=secret)["webhook-signature"] == headers["webhook-signature"]  # our Polar signs so
    stripped = {**headers, "webhook-signature": Webhook(secret).sign(msg.id, NOW, msg.body)}
    with pytest.raises(pw.Rejected, match="no matching signature"):
        pw.verify(secret, stripped, msg.body, NOW)
