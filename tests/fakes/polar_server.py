"""A small Polar API of ours on 127.0.0.1, speaking Polar's shapes and error bodies.

Every request the bot sends is checked against Polar's OpenAPI document (query names, bodies,
auth and version headers) and every response we send is checked too; `violations` collects
anything off, and the tests assert it stays empty. Faults can be queued per route.
"""
from __future__ import annotations

import re
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from . import openapi
from .http import FakeApi, DropConnection, FakeServer, Request, Response

ORG_ID = "1dbfc517-0bbf-4301-9ba8-555ca42b9737"
TOKEN = "polar_oat_test_token"

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


class FakePolar(FakeApi):
    def __init__(self, latency_s: float = 0.0):
        self.lock = threading.RLock()
        self.customers: dict[str, dict] = {}
        self.events: list[dict] = []
        self.event_external_ids: set[str] = set()
        self.orders: list[dict] = []
        self.refunds: list[dict] = []
        self.faults: list[Fault] = []
        self.violations: list[str] = []
        self.server = FakeServer(self.handle, latency_s)

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
        self.events.append(ev)
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
            items = [e for e in self.events
                     if _match(req, "external_customer_id", e["external_customer_id"]) and _match(req, "name", e["name"])]
            for key, values in req.query.items():
                if key.startswith("metadata[") and key.endswith("]"):
                    k = key[len("metadata["):-1]
                    items = [e for e in items if str(e["metadata"].get(k)) in values]
            return self._page(req, [_public(e) for e in items])
        if template == "/v1/orders/":
            items = [o for o in self.orders if _match(req, "external_customer_id", o["_external_customer_id"])]
            sorting = req.query.get("sorting", ["-created_at"])
            items.sort(key=lambda o: o["created_at"], reverse=sorting[0].startswith("-"))
            return self._page(req, [_public(o) for o in items])
        if template == "/v1/refunds/" and method == "get":
            items = [r for r in self.refunds if _match(req, "order_id", r["order_id"])]
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
        chunk = items[(page - 1) * limit: page * limit]
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
        refund = {
            "created_at": now_iso(), "modified_at": None, "id": str(uuid.uuid4()), "metadata": body.get("metadata") or {},
            "status": "succeeded", "reason": body["reason"], "amount": body["amount"], "tax_amount": 0,
            "currency": "usd", "organization_id": ORG_ID, "order_id": order["id"], "subscription_id": None,
            "customer_id": order["customer_id"], "revoke_benefits": bool(body.get("revoke_benefits", False)),
            "dispute": None,
        }
        self.refunds.append(refund)
        order["refunded_amount"] += body["amount"]
        order["refundable_amount"] -= body["amount"]
        order["status"] = "refunded" if order["refundable_amount"] == 0 else "partially_refunded"
        return Response(201, refund)


def _match(req: Request, name: str, value) -> bool:
    wanted = req.query.get(name)
    return not wanted or str(value) in wanted


def _public(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if not k.startswith("_")}
