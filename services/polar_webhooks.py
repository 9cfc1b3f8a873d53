"""Polar's webhooks (SPEC 4): verify a delivery, read it into a typed event, and serve
`POST /polar/webhooks`.

Three pieces, each usable alone:
- `verify(secret, headers, body, now)`: the Standard Webhooks check Polar's SDK `validate_event`
  makes. Polar hands its signer base64 of the secret, so the HMAC-SHA256 key is the secret's UTF-8
  bytes; we give the `standardwebhooks` package the same base64 form. Returns the JSON payload, or
  raises `Rejected` with a reason fit for a 401 (never the secret or a signature).
- `parse(payload)`: `RefundUpdate` (refund.created / refund.updated), `OrderRefunded`
  (order.refunded) or `Unknown` (any other type: acknowledged, ignored). Pure.
- `make_handler(secret, on_event, seen, forget=None)`: an aiohttp handler. 401 and nothing else
  for a missing or bad signature or a timestamp out of the window; a delivery whose webhook-id was
  seen before is a 200 no-op; an unknown type is a 200 no-op; otherwise `on_event(event,
  webhook_id)` runs and the answer is 200. If `on_event` raises, the id is forgotten (when
  `forget` is given) and the answer is 500, so Polar's retry of the same delivery is handled.

Why `standardwebhooks` and not Polar's SDK helper: `polar_sdk.webhooks.validate_event` is this
same call (base64 of the secret into `standardwebhooks.Webhook`) followed by pydantic models of
every Polar object, which would pull in the whole generated SDK for three event types. The
package's `Webhook.verify` reads the wall clock, so the timestamp window is checked here against
an injectable `now` (the same 5 minutes the package and Polar's SDK use), and the signature is the
package's `Webhook.sign` compared in constant time with each `v1,` signature of the header.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import Awaitable, Callable, Mapping, Union

from aiohttp import web
from standardwebhooks.webhooks import Webhook

log = logging.getLogger(__name__)

TOLERANCE = timedelta(minutes=5)  # Standard Webhooks' window, as the package and Polar's SDK use
MAX_BODY_BYTES = 1 << 20  # a refund or order payload is a few KiB; refuse anything absurd unread
REFUND_EVENTS = ("refund.created", "refund.updated")
FINAL_STATUSES = ("succeeded", "failed", "canceled")


class Rejected(Exception):
    """A delivery that must get 401 and change nothing. `reason` is safe to log and to answer."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Malformed(ValueError):
    """A signed payload of a known type that lacks what the type must carry."""


def verify(secret: str, headers: Mapping[str, str], body: bytes | str, now: datetime | None = None) -> dict:
    """The verified JSON payload of one delivery, or `Rejected` (missing headers, bad timestamp,
    bad signature, or a body that is not a JSON object)."""
    if not secret:
        raise Rejected("no webhook secret configured")
    h = {k.lower(): v for k, v in headers.items()}
    msg_id, stamp, signatures = h.get("webhook-id"), h.get("webhook-timestamp"), h.get("webhook-signature")
    if not (msg_id and stamp and signatures):
        raise Rejected("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        sent = datetime.fromtimestamp(int(stamp), tz=timezone.utc)
    except (ValueError, OverflowError, OSError):
        raise Rejected("webhook-timestamp is not a Unix time") from None
    now = now or datetime.now(timezone.utc)
    if sent < now - TOLERANCE:
        raise Rejected("webhook-timestamp too old")
    if sent > now + TOLERANCE:
        raise Rejected("webhook-timestamp too new")
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
    except UnicodeDecodeError:
        raise Rejected("body is not UTF-8") from None
    signer = Webhook(base64.b64encode(secret.encode()).decode())  # exactly as Polar's validate_event
    expected = base64.b64decode(signer.sign(msg_id, sent, text).split(",", 1)[1])
    if not any(hmac.compare_digest(expected, sig) for sig in _v1_signatures(signatures)):
        raise Rejected("no matching signature")
    try:
        payload = json.loads(text)
    except ValueError:
        raise Rejected("body is not JSON") from None
    if not isinstance(payload, dict):
        raise Rejected("body is not a JSON object")
    return payload


def _v1_signatures(header: str) -> list[bytes]:
    """The `v1,<base64>` entries of a webhook-signature header (space separated); others skipped."""
    out = []
    for entry in header.split():
        version, _, sig = entry.partition(",")
        if version != "v1" or not sig:
            continue
        try:
            out.append(base64.b64decode(sig, validate=True))
        except (binascii.Error, ValueError):
            continue
    return out


# --- events ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RefundUpdate:
    """refund.created or refund.updated: one refund's state as Polar reports it.

    `case_id` is metadata.case_id (set by the bot on every refund it makes), None for a refund the
    bot did not make (Polar's own, e.g. to prevent a chargeback: `reason` dispute_prevention,
    `dispute_status` prevented). Deliveries can arrive out of order and more than once: act on
    `status` idempotently, and order two reports of one refund by `modified_at` (None: never
    modified, i.e. as created). `succeeded` is money moved; a succeeded refund can later be
    reported `failed` or `canceled` (Polar reverts its ledger then)."""

    event_type: str
    refund_id: str
    order_id: str
    status: str  # pending, succeeded, failed, canceled
    amount_cents: int
    tax_amount_cents: int
    currency: str
    reason: str
    case_id: str | None
    customer_id: str
    created_at: str
    modified_at: str | None
    dispute_status: str | None
    metadata: Mapping[str, object] = field(default_factory=dict, hash=False)

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def by_bot(self) -> bool:
        return self.case_id is not None


@dataclass(frozen=True)
class OrderRefunded:
    """order.refunded: Polar refunded (part of) an order; amounts in cents, as of the event."""

    order_id: str
    customer_id: str
    external_customer_id: str | None  # our customer_id (SPEC 1.1)
    status: str  # partially_refunded or refunded
    total_amount_cents: int
    refunded_amount_cents: int
    refundable_amount_cents: int
    currency: str


@dataclass(frozen=True)
class Unknown:
    """Any other event type: acknowledged and ignored."""

    event_type: str


Event = Union[RefundUpdate, OrderRefunded, Unknown]


def parse(payload: Mapping) -> Event:
    """The typed event of a verified payload; `Malformed` if a known type lacks its fields."""
    event_type = str(payload.get("type") or "")
    data = payload.get("data")
    if event_type not in (*REFUND_EVENTS, "order.refunded"):
        return Unknown(event_type)
    if not isinstance(data, Mapping):
        raise Malformed(f"{event_type}: data is not an object")
    try:
        if event_type == "order.refunded":
            customer = data.get("customer") or {}
            return OrderRefunded(
                order_id=str(data["id"]), customer_id=str(data["customer_id"]),
                external_customer_id=customer.get("external_id"), status=str(data["status"]),
                total_amount_cents=_cents(data["total_amount"]), refunded_amount_cents=_cents(data["refunded_amount"]),
                refundable_amount_cents=_cents(data["refundable_amount"]), currency=str(data["currency"]))
        metadata = dict(data.get("metadata") or {})
        case_id = metadata.get("case_id")
        dispute = data.get("dispute") or {}
        return RefundUpdate(
            event_type=event_type, refund_id=str(data["id"]), order_id=str(data["order_id"]),
            status=str(data["status"]), amount_cents=_cents(data["amount"]),
            tax_amount_cents=_cents(data.get("tax_amount", 0)), currency=str(data["currency"]),
            reason=str(data["reason"]), case_id=None if case_id is None else str(case_id),
            customer_id=str(data["customer_id"]), created_at=str(data["created_at"]),
            modified_at=data.get("modified_at"), dispute_status=dispute.get("status"),
            metadata=MappingProxyType(metadata))
    except KeyError as exc:
        raise Malformed(f"{event_type}: data has no {exc.args[0]!r}") from None


def _cents(value) -> int:
    """Polar's amounts are integer cents; a float or a string there is a payload we do not trust."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise Malformed(f"amount {value!r} is not integer cents")
    return value


# --- the endpoint ------------------------------------------------------------------------------------

OnEvent = Callable[[Union[RefundUpdate, OrderRefunded], str], Awaitable[None]]
Seen = Callable[[str, str], Awaitable[bool]]
Forget = Callable[[str], Awaitable[None]]


def make_handler(secret: str | None, on_event: OnEvent, seen: Seen, forget: Forget | None = None,
                 clock: Callable[[], datetime] | None = None):
    """The aiohttp handler of `POST /polar/webhooks`.

    seen(webhook_id, event_type) -> bool records the delivery id atomically and returns True the
    first time, False for a repeat (`services.store.WebhookDeliveries.first_time`).
    on_event(event, webhook_id) does the work; it must be quick (Polar waits for the answer) and
    idempotent on the refund's state, since Polar can report one state in two deliveries with
    different ids (refund.created already succeeded, then refund.updated succeeded).
    forget(webhook_id) undoes `seen` when on_event fails, so Polar's retry is not taken for a repeat.
    Without a secret every delivery is refused: an unverifiable delivery is as good as unsigned.
    """
    clock = clock or (lambda: datetime.now(timezone.utc))

    async def handler(request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return web.json_response({"error": "body too large"}, status=413)
        body = await request.read()
        if len(body) > MAX_BODY_BYTES:
            return web.json_response({"error": "body too large"}, status=413)
        try:
            payload = verify(secret or "", request.headers, body, clock())
        except Rejected as exc:
            log.warning("Polar webhook refused (401): %s", exc.reason)
            return web.json_response({"error": exc.reason}, status=401)
        webhook_id = request.headers["webhook-id"]
        try:
            event = parse(payload)
        except Malformed as exc:  # signed by Polar yet unreadable: say so; Polar retries, polling covers
            log.error("Polar webhook %s unreadable: %s", webhook_id, exc)
            return web.json_response({"error": str(exc)}, status=400)
        if isinstance(event, Unknown):
            return web.json_response({"status": "ignored", "type": event.event_type})
        if not await seen(webhook_id, payload["type"]):
            return web.json_response({"status": "duplicate"})
        try:
            await on_event(event, webhook_id)
        except Exception:
            log.exception("Polar webhook %s (%s) failed; Polar will retry it", webhook_id, payload["type"])
            if forget is not None:
                await forget(webhook_id)
            return web.json_response({"error": "not processed; retry"}, status=500)
        return web.json_response({"status": "ok"})

    return handler
