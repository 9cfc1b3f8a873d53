"""A small Polar API of ours on 127.0.0.1, speaking Polar's shapes and error bodies.

Every request the bot sends is checked against Polar's OpenAPI document (query names, bodies,
auth and version headers) and every response we send is checked too; `violations` collects
anything off, and the tests assert it stays empty. Faults can be queued per route.

Refunds have Polar's statuses. A refund is created with `next_refund_status` (default
`succeeded`), or the next status queued with `queue_refund_statuses`; `settle_refund` later moves a
pending one to `succeeded`, `failed` or `canceled`. As in Polar, an order's `refunded_amount` and
`refundable_amount` move only when a refund succeeds (and move back when a succeeded one is
reverted). `refund_outside` is a refund Polar makes on its own (no metadata of ours), as it does
to prevent a chargeback.

Webhooks: each change queues the deliveries Polar would send (`refund.created`, `refund.updated`,
`order.updated`, `order.refunded`), their payloads validated against the document's `webhooks`
schemas. `webhook_endpoint(url, secret)` says where they go; `deliver()` sends the queued ones, or
`auto_deliver=True` sends them from a thread of their own, as Polar's workers do, never inside the
API request that caused them. `send` signs a message with the Standard Webhooks scheme exactly as
Polar does (the `standardwebhooks` signer given base64 of the secret, so the HMAC key is the
secret's UTF-8 bytes) and can also send it forged, stale, or without its headers; sending the
same message again is a duplicate delivery (same webhook-id, new timestamp, as Polar's retries).
"""
from __future__ import annotations

import base64
import json
import queue
import re
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import httpx
from standardwebhooks.webhooks import Webhook

from . import openapi
from .http import FakeApi, DropConnection, FakeServer, Request, Response

ORG_ID = "1dbfc517-0bbf-4301-9ba8-555ca42b9737"
TOKEN = "polar_oat_test_token"
WEBHOOK_SECRET = "polar_whs_test_0123456789abcdef"
REFUND_STATUSES = ("pending", "succeeded", "failed", "canceled")

ROUTES = [
    (re.compile(r"^/v1/customers/external/(?P<external_id>[^/]+)$"), "/v1/customers/external/{external_id}"),
    (re.compile(r"^/v1/events/$"), "/v1/events/"),
    (re.compile(r"^/v1/events/ingest$"), "/v1/events/ingest"),
    (re.compile(r"^/v1/orders/$"), "/v1/orders/"),
    (re.compile(r"^/v1/refunds/$"), "/v1/refunds/"),
]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass
class Fault:
    method: str
    route: str  # path template
    kind: str  # "status", "drop_after" (do the work, lose the response), "drop_before"
    status: int = 500
    retry_after: str | None = None
    times: int = 1


@dataclass(frozen=True)
class WebhookMessage:
    """One webhook event as Polar sends it: its webhook-id and the exact JSON text it signs."""

    id: str
    type: str
    body: str

    @property
    def payload(self) -> dict:
        return json.loads(self.body)


@dataclass(frozen=True)
class Delivery:
    """One POST of a message to the endpoint and what the endpoint answered."""

    message_id: str
    type: str
    how: str  # "signed", "forged", "old", "unsigned"
    status: int
    body: str


def sign(secret: str, msg_id: str, timestamp: datetime, body: str) -> str:
    """The webhook-signature header Polar sends: its signer is handed base64 of the secret."""
    return Webhook(base64.b64encode(secret.encode()).decode()).sign(msg_id, timestamp, body)


class FakePolar(FakeApi):
    def __init__(self, latency_s: float = 0.0):
        self.lock = threading.RLock()
        self.customers: dict[str, dict] = {}
        self.events: list[dict] = []
        self._events_of: dict[str, list[dict]] = {}  # external customer id -> its events (self.events' order)
        self.event_external_ids: set[str] = set()
        self.orders: list[dict] = []
        self.refunds: list[dict] = []
        self.faults: list[Fault] = []
        # a rate limit: every Nth request (any route, counted from when it is set) answered 429
        # with this Retry-After, before any work is done (0: off)
        self.rate_limit_every = 0
        self.rate_limit_retry_after = "1"
        self.rate_limited: list[tuple[str, str]] = []  # (method, route) of each request answered 429
        self._seen = 0
        self.violations: list[str] = []
        self.server = FakeServer(self.handle, latency_s)
        # refund statuses: the queue first, then the default
        self.next_refund_status = "succeeded"
        self.refund_status_queue: list[str] = []
        # webhooks
        self.webhook_url: str | None = None
        self.webhook_secret: str | None = None
        self.outbox: list[WebhookMessage] = []  # every message Polar would send, in order
        self.delivered: set[str] = set()  # message ids deliver() has sent
        self.deliveries: list[Delivery] = []
        self._auto: queue.Queue | None = None
        self._auto_thread: threading.Thread | None = None

    # --- setup helpers --------------------------------------------------------------------------


    def add_customer(self, external_id: str, email: str = "ada@example.com", name: str | None = "Ada Lovelace") -> dict:
        c = {
            "id": str(uuid.uuid4()), "created_at": now_iso(), "modified_at": None, "metadata": {},
            "external_id": external_id, "email": email, "email_verified": True, "type": "individual",
            "name": name, "billing_name": name, "billing_address": None, "tax_id": None,
            "organization_id": ORG_ID, "deleted_at": None, "first_user_event_at": None, "avatar_url": None,
            "locale": None, "default_payment_method_id": None,
        }
        self.customers[external_id] = c
        return c

    def add_usage_event(self, external_customer_id: str, name: str, metadata: dict, external_id: str | None = None):
        c = self.customers.get(external_customer_id)
        ev = {
            "id": str(uuid.uuid4()), "timestamp": now_iso(), "organization_id": ORG_ID,
            "customer_id": c["id"] if c else None, "customer": c, "external_customer_id": external_customer_id,
            "external_member_id": None, "member_id": None, "label": name, "name": name, "source": "user",
            "metadata": metadata, "parent_id": None, "child_count": 0,
        }
        ev["_external_id"] = external_id
        ev["_seq"] = len(self.events)
        self.events.append(ev)
        self._events_of.setdefault(external_customer_id, []).append(ev)
        return ev

    def add_order(self, external_customer_id: str, created_at: datetime, amount: int,
                  billing_reason: str = "subscription_cycle", refunded: int = 0) -> dict:
        c = self.customers[external_customer_id]
        order_customer = {k: v for k, v in c.items() if k not in ("locale", "default_payment_method_id")}
        o = {
            "id": str(uuid.uuid4()), "created_at": iso(created_at), "modified_at": None, "status": "paid",
            "paid": True, "subtotal_amount": amount, "discount_amount": 0, "net_amount": amount, "tax_amount": 0,
            "total_amount": amount, "applied_balance_amount": 0, "due_amount": 0, "refunded_amount": refunded,
            "refunded_tax_amount": 0, "currency": "usd", "billing_reason": billing_reason, "billing_name": c["name"],
            "billing_address": None, "invoice_number": f"INV-{len(self.orders) + 1:04d}", "is_invoice_generated": True,
            "receipt_number": None, "customer_id": c["id"], "product_id": None, "discount_id": None,
            "subscription_id": None, "checkout_id": None, "metadata": {}, "platform_fee_amount": 0,
            "platform_fee_currency": None, "customer": order_customer, "product": None, "discount": None,
            "subscription": None, "items": [], "description": "Orzbob Cloud usage",
            "refundable_amount": amount - refunded, "refundable_tax_amount": 0, "custom_field_data": {},
            "_external_customer_id": external_customer_id,
        }
        self.orders.append(o)
        return o

    def add_refund(self, order: dict, amount: int, status: str = "succeeded", metadata: dict | None = None,
                   reason: str = "service_disruption") -> dict:
        """A refund made earlier, as if through POST /v1/refunds/ (its webhooks are queued too)."""
        with self.lock:
            return self._make_refund(order, amount, reason, metadata or {}, status)

    def fail(self, method: str, route: str, kind: str = "status", status: int = 500, retry_after: str | None = None,
             times: int = 1):
        self.faults.append(Fault(method.upper(), route, kind, status, retry_after, times))

    # --- the server -----------------------------------------------------------------------------

    def handle(self, req: Request) -> Response:
        for pattern, template in ROUTES:
            m = pattern.match(req.path)
            if m:
                break
        else:
            self.violations.append(f"{req.method} {req.path}: not an endpoint billing-bot may use")
            return Response(404, {"error": "ResourceNotFound", "detail": "Not found"})
        method = req.method.lower()
        try:
            openapi.operation(template, method)
        except KeyError:
            self.violations.append(f"{req.method} {template}: method not in the OpenAPI subset")
            return Response(405, {"detail": "Method Not Allowed"})
        if req.headers.get("authorization") != f"Bearer {TOKEN}":
            return Response(401, {"error": "Unauthorized", "detail": "Invalid or missing token"})
        if req.headers.get("polar-version") != "2026-04":
            self.violations.append(f"{req.method} {template}: Polar-Version header is {req.headers.get('polar-version')!r}")
        self.violations.extend(f"{req.method} {template}: {e}" for e in openapi.query_errors(template, method, req.query))
        if req.method == "POST":
            self.violations.extend(f"{req.method} {template} body: {e}"
                                   for e in openapi.request_body_errors(template, method, req.json()))

        if self._rate_limited(req.method, template):
            return Response(429, {"error": "TooManyRequests", "detail": "Rate limit exceeded"},
                            {"Retry-After": self.rate_limit_retry_after})
        fault = self._take_fault(req.method, template)
        if fault and fault.kind == "status":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            body = ({"error": "TooManyRequests", "detail": "Rate limit exceeded"} if fault.status == 429
                    else {"error": "InternalServerError", "detail": "Something went wrong"})
            return Response(fault.status, body, headers)
        if fault and fault.kind == "drop_before":
            raise DropConnection()

        with self.lock:
            resp = self._route(template, method, req, m.groupdict())
        if resp.status < 500:
            body = resp.body if not isinstance(resp.body, (bytes, str)) else None
            self.violations.extend(f"response {req.method} {template} {resp.status}: {e}"
                                   for e in openapi.response_errors(template, method, resp.status, body))
        if fault and fault.kind == "drop_after":
            raise DropConnection()
        return resp

    def rate_limit(self, every: int, retry_after: str = "1") -> None:
        """Answer every `every`th request from now on 429 Too Many Requests (0: stop)."""
        with self.lock:
            self.rate_limit_every, self.rate_limit_retry_after, self._seen = every, retry_after, 0

    def _rate_limited(self, method: str, template: str) -> bool:
        with self.lock:
            if not self.rate_limit_every:
                return False
            self._seen += 1
            if self._seen % self.rate_limit_every:
                return False
            self.rate_limited.append((method, template))
            return True

    def _take_fault(self, method: str, template: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.method == method and f.route == template and f.times > 0:
                    f.times -= 1
                    return f
        return None

    def _route(self, template: str, method: str, req: Request, params: dict) -> Response:
        if template == "/v1/customers/external/{external_id}":
            c = self.customers.get(params["external_id"])
            if c is None:
                return Response(404, {"error": "ResourceNotFound", "detail": "Not found"})
            return Response(200, c)
        if template == "/v1/events/":
            wanted = req.query.get("external_customer_id")
            pool = ([e for c in dict.fromkeys(wanted) for e in self._events_of.get(c, ())] if wanted
                    else self.events)  # by customer: a bench's Polar holds tens of thousands of events
            items = [e for e in pool
                     if _match(req, "external_customer_id", e["external_customer_id"]) and _match(req, "name", e["name"])]
            # Polar's default is newest first; ties (the same microsecond) in the order metered
            newest_first = req.query.get("sorting", ["-timestamp"])[0].startswith("-")
            items = sorted(items, key=lambda e: (e["timestamp"], e["_seq"]), reverse=newest_first)
            for key, values in req.query.items():
                if key.startswith("metadata[") and key.endswith("]"):
                    k = key[len("metadata["):-1]
                    items = [e for e in items if str(e["metadata"].get(k)) in values]
            return self._page(req, items)
        if template == "/v1/orders/":
            items = [o for o in self.orders if _match(req, "external_customer_id", o["_external_customer_id"])]
            sorting = req.query.get("sorting", ["-created_at"])
            items.sort(key=lambda o: o["created_at"], reverse=sorting[0].startswith("-"))
            return self._page(req, items)
        if template == "/v1/refunds/" and method == "get":
            items = [r for r in self.refunds if _match(req, "order_id", r["order_id"]) and _match(req, "id", r["id"])]
            if req.q("succeeded") == "true":  # Polar: only `true` filters; false or absent lists all
                items = [r for r in items if r["status"] == "succeeded"]
            return self._page(req, items)
        if template == "/v1/refunds/" and method == "post":
            return self._create_refund(req.json())
        if template == "/v1/events/ingest":
            inserted = duplicates = 0
            for ev in req.json()["events"]:
                ext = ev.get("external_id")
                if ext and ext in self.event_external_ids:
                    duplicates += 1
                    continue
                if ext:
                    self.event_external_ids.add(ext)
                self.add_usage_event(ev["external_customer_id"], ev["name"], ev.get("metadata") or {}, ext)
                inserted += 1
            return Response(200, {"inserted": inserted, "duplicates": duplicates})
        raise AssertionError(template)

    def _page(self, req: Request, items: list) -> Response:
        limit = int(req.q("limit", "10"))
        page = int(req.q("page", "1"))
        total = len(items)
        max_page = max((total + limit - 1) // limit, 1)
        chunk = [_public(x) for x in items[(page - 1) * limit: page * limit]]  # only the page's
        return Response(200, {"items": chunk, "pagination": {"total_count": total, "max_page": max_page}})

    def _create_refund(self, body: dict) -> Response:
        order = next((o for o in self.orders if o["id"] == body.get("order_id")), None)
        if order is None:
            return Response(404, {"error": "ResourceNotFound", "detail": "Order not found"})
        if order["refundable_amount"] <= 0:
            return Response(403, {"error": "RefundedAlready", "detail": "Order is already fully refunded"})
        if body["amount"] > order["refundable_amount"]:
            return Response(422, {"detail": [{"loc": ["body", "amount"], "msg": "Amount exceeds refundable amount",
                                              "type": "value_error"}]})
        refund = self._make_refund(order, body["amount"], body["reason"], body.get("metadata") or {},
                                   self._take_refund_status(), bool(body.get("revoke_benefits", False)))
        return Response(201, _public(refund))

    def _take_refund_status(self) -> str:
        status = self.refund_status_queue.pop(0) if self.refund_status_queue else self.next_refund_status
        assert status in REFUND_STATUSES, status
        return status

    def _make_refund(self, order: dict, amount: int, reason: str, metadata: dict, status: str,
                     revoke_benefits: bool = False, dispute: dict | None = None) -> dict:
        """A refund as Polar records it; webhooks in Polar's order (the ledger's order.updated, then
        refund.created, then order.refunded when the money moved)."""
        refund = {
            "created_at": now_iso(), "modified_at": None, "id": str(uuid.uuid4()), "metadata": metadata,
            "status": status, "reason": reason, "amount": amount, "tax_amount": 0,
            "currency": "usd", "organization_id": ORG_ID, "order_id": order["id"], "subscription_id": None,
            "customer_id": order["customer_id"], "revoke_benefits": revoke_benefits, "dispute": dispute,
        }
        self.refunds.append(refund)
        if status == "succeeded":
            self._move_order(order, amount)
        self.emit("refund.created", refund)
        if status == "succeeded":
            self.emit("order.refunded", order)
        return refund

    def _move_order(self, order: dict, amount: int) -> None:
        """Money moved (or, negative, moved back): the order's amounts and its order.updated."""
        order["refunded_amount"] += amount
        order["refundable_amount"] -= amount
        order["modified_at"] = now_iso()
        order["status"] = ("paid" if order["refunded_amount"] == 0 else
                           "refunded" if order["refundable_amount"] == 0 else "partially_refunded")
        self.emit("order.updated", order)

    # --- refund outcomes ----------------------------------------------------------------------------

    def queue_refund_statuses(self, *statuses: str) -> None:
        """The statuses the next refunds are created with, in order (then next_refund_status)."""
        assert all(s in REFUND_STATUSES for s in statuses), statuses
        with self.lock:
            self.refund_status_queue.extend(statuses)

    def refund_by_id(self, refund_id: str) -> dict:
        return next(r for r in self.refunds if r["id"] == refund_id)

    def settle_refund(self, refund_id: str, status: str) -> dict:
        """A refund's later outcome: pending -> succeeded / failed / canceled, or a succeeded refund
        reverted (failed / canceled), which Polar's ledger undoes. Queues Polar's webhooks."""
        assert status in ("succeeded", "failed", "canceled"), status
        with self.lock:
            refund = self.refund_by_id(refund_id)
            before = refund["status"]
            assert before in ("pending", "succeeded") and before != status, f"{before} -> {status}"
            order = next(o for o in self.orders if o["id"] == refund["order_id"])
            refund["status"] = status
            refund["modified_at"] = now_iso()
            if status == "succeeded":
                self._move_order(order, refund["amount"])
            elif before == "succeeded":
                self._move_order(order, -refund["amount"])
            self.emit("refund.updated", refund)
            if status == "succeeded":
                self.emit("order.refunded", order)
            return refund

    def refund_outside(self, order_id: str, amount: int | None = None, status: str = "succeeded",
                       reason: str = "dispute_prevention", disputed: bool = True) -> dict:
        """A refund Polar makes on its own, without our metadata: to prevent a chargeback it refunds
        the order (by default all that is left) and the dispute shows as `prevented`."""
        with self.lock:
            order = next(o for o in self.orders if o["id"] == order_id)
            amount = order["refundable_amount"] if amount is None else amount
            dispute = None
            if disputed:
                dispute = {
                    "created_at": now_iso(), "modified_at": None, "id": str(uuid.uuid4()), "status": "prevented",
                    "resolved": False, "closed": True, "amount": amount, "tax_amount": 0, "currency": "usd",
                    "reason": "fraudulent", "evidence_due_by": None, "past_due": False, "order_id": order_id,
                    "payment_id": str(uuid.uuid4()),
                }
            return self._make_refund(order, amount, reason, {}, status, dispute=dispute)

    # --- webhooks -----------------------------------------------------------------------------------

    def webhook_endpoint(self, url: str, secret: str = WEBHOOK_SECRET, auto_deliver: bool = False) -> None:
        """Where Polar sends webhooks; with auto_deliver, each is sent as it happens, from a thread."""
        self.webhook_url, self.webhook_secret = url, secret
        if auto_deliver and self._auto is None:
            self._auto = queue.Queue()
            self._auto_thread = threading.Thread(target=self._auto_loop, daemon=True)
            self._auto_thread.start()

    def message(self, event_type: str, data: dict) -> WebhookMessage:
        """A webhook message, its payload checked against the document's schema for the type."""
        payload = {"type": event_type, "timestamp": now_iso(), "data": _public(data)}
        self.violations.extend(f"webhook {event_type}: {e}" for e in openapi.webhook_errors(event_type, payload))
        return WebhookMessage(f"msg_{uuid.uuid4().hex}", event_type, json.dumps(payload))

    def emit(self, event_type: str, data: dict) -> WebhookMessage:
        """Queue a message Polar would send now."""
        msg = self.message(event_type, data)
        with self.lock:
            self.outbox.append(msg)
        if self._auto is not None:
            self._auto.put(msg)
        return msg

    def messages(self, event_type: str | None = None) -> list[WebhookMessage]:
        with self.lock:
            return [m for m in self.outbox if event_type is None or m.type == event_type]

    def deliver(self) -> list[Delivery]:
        """Send every queued message not yet sent, in order. Never call it while holding the lock:
        the bot may call our API while it handles a delivery."""
        with self.lock:
            todo = [m for m in self.outbox if m.id not in self.delivered]
            self.delivered.update(m.id for m in todo)
        return [self.send(m) for m in todo]

    def _auto_loop(self) -> None:
        while True:
            msg = self._auto.get()
            if msg is None:
                return
            with self.lock:
                if msg.id in self.delivered:
                    continue
                self.delivered.add(msg.id)
            try:
                self.send(msg)
            except httpx.HTTPError:
                pass  # the bot is not listening (yet); polling is the fallback, as with Polar

    def send(self, msg: WebhookMessage, *, how: str = "signed", age: timedelta = timedelta(0),
             secret: str | None = None) -> Delivery:
        """POST one message to the endpoint. how: "signed" (as Polar does; again = a duplicate
        delivery), "forged" (signed with another secret), "old" (signed, webhook-timestamp `age`
        ago, default 10 minutes), "unsigned" (no webhook-* headers)."""
        assert self.webhook_url, "call webhook_endpoint(url, secret) first"
        secret = secret or self.webhook_secret
        when = datetime.now(timezone.utc) - (age or (timedelta(minutes=10) if how == "old" else timedelta(0)))
        headers = {"content-type": "application/json", "user-agent": "polar.sh webhooks"}
        if how != "unsigned":
            key = secret if how != "forged" else "forged-" + secret
            headers.update({"webhook-id": msg.id, "webhook-timestamp": str(int(when.timestamp())),
                            "webhook-signature": sign(key, msg.id, when, msg.body)})
        response = httpx.post(self.webhook_url, content=msg.body.encode(), headers=headers, timeout=10)
        delivery = Delivery(msg.id, msg.type, how, response.status_code, response.text)
        with self.lock:
            self.deliveries.append(delivery)
        return delivery

    def stop(self):
        if self._auto is not None:
            self._auto.put(None)
            self._auto_thread.join(timeout=5)
        super().stop()


def _match(req: Request, name: str, value) -> bool:
    wanted = req.query.get(name)
    return not wanted or str(value) in wanted


def _public(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if not k.startswith("_")}
