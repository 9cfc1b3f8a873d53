"""Validate requests, responses and webhook payloads against the subset of Polar's OpenAPI document we
keep in tests/data."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).resolve().parent.parent / "data" / "polar-openapi-subset.json"
URN = "urn:polar-openapi"


@lru_cache(maxsize=1)
def spec() -> dict:
    return json.loads(SPEC_PATH.read_text())


@lru_cache(maxsize=1)
def _registry() -> Registry:
    return Registry().with_resource(URN, Resource.from_contents(spec(), default_specification=DRAFT202012))


def _pointer(*parts: str) -> str:
    return "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def _errors(pointer: str, instance) -> list[str]:
    validator = Draft202012Validator({"$ref": f"{URN}#/{pointer}"}, registry=_registry())
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}"
            for e in validator.iter_errors(instance)]


def operation(path_template: str, method: str) -> dict:
    return spec()["paths"][path_template][method]


def request_body_errors(path_template: str, method: str, body) -> list[str]:
    return _errors(_pointer("paths", path_template, method, "requestBody", "content", "application/json", "schema"),
                   body)


def response_errors(path_template: str, method: str, status: int, body) -> list[str]:
    responses = operation(path_template, method)["responses"]
    if str(status) not in responses:
        return [f"status {status} is not documented for {method.upper()} {path_template}"]
    content = responses[str(status)].get("content")
    if not content:
        return []
    pointer = _pointer("paths", path_template, method, "responses", str(status), "content", "application/json",
                       "schema")
    items = body.get("items") if isinstance(body, dict) else None
    if not isinstance(items, list) or len(items) < 2:
        return _errors(pointer, body)
    # A page of a list: the envelope with each item, one item at a time, and an item shaped like
    # one already checked is not checked again. An event checks against the union of Polar's
    # forty event schemas (~30 ms): a bench's tens of thousands of events would take the fake
    # minutes a listing, and every event the fake makes has the same shape.
    errors: list[str] = []
    for item in items:
        errors.extend(_item_errors(pointer, json.dumps({**body, "items": [item]}, sort_keys=True),
                                   json.dumps(_shape(item), sort_keys=True)))
    return errors


def _item_errors(pointer: str, page_of_one: str, shape: str) -> list[str]:
    key = (pointer, shape)
    if key not in _CHECKED_SHAPES:
        _CHECKED_SHAPES[key] = _errors(pointer, json.loads(page_of_one))
    return list(_CHECKED_SHAPES[key])


_CHECKED_SHAPES: dict[tuple[str, str], list[str]] = {}
# values that differ from item to item without changing what the schema says of them: identifiers
# and times (formats a fake writes the same way every time) and the free-form metadata's values
_VARYING = {"id", "timestamp", "created_at", "modified_at", "customer_id", "organization_id", "external_customer_id",
            "external_id", "order_id", "subscription_id", "checkout_id", "product_id", "email", "name", "billing_name"}


def _shape(value, key: str | None = None, in_metadata: bool = False):
    """The item with its varying values replaced by their types."""
    if isinstance(value, dict):
        return {k: _shape(v, k, in_metadata or k == "metadata") for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v, key, in_metadata) for v in value]
    if in_metadata or key in _VARYING:
        return type(value).__name__
    return value


def webhook_errors(event_type: str, payload) -> list[str]:
    """What is off in a webhook payload of this type, by the document's `webhooks` section."""
    if event_type not in spec().get("webhooks", {}):
        return [f"webhook type {event_type!r} is not in the OpenAPI subset (scripts/extract_polar_subset.py)"]
    return _errors(_pointer("webhooks", event_type, "post", "requestBody", "content", "application/json", "schema"),
                   payload)


def query_errors(path_template: str, method: str, query: dict[str, list[str]]) -> list[str]:
    params = {p["name"]: p for p in operation(path_template, method).get("parameters", []) if p["in"] == "query"}
    errors = []
    for name, values in query.items():
        base = name.split("[", 1)[0]
        p = params.get(base)
        if p is None:
            errors.append(f"query parameter {name!r} is not in the OpenAPI document")
            continue
        if "[" in name and p.get("style") != "deepObject":
            errors.append(f"query parameter {name!r} uses deepObject style but {base} is not deepObject")
            continue
        schema = p.get("schema", {})
        for v in values:
            if schema.get("type") == "integer":
                if not v.lstrip("-").isdigit():
                    errors.append(f"{name}={v!r}: not an integer")
                    continue
                iv = int(v)
                if "exclusiveMinimum" in schema and iv <= schema["exclusiveMinimum"]:
                    errors.append(f"{name}={v}: must be > {schema['exclusiveMinimum']}")
            if name == "limit" and int(v) > 100:
                errors.append(f"limit={v}: Polar's maximum page size is 100")
    return errors
