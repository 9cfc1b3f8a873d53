"""Cut the part of Polar's OpenAPI document that billing-bot uses into tests/data.

Run from the repository root with ../shared beside it:
    python scripts/extract_polar_subset.py
The tests validate every request and response of our fake Polar server, and every webhook
payload it sends, against the result, so they pass on a fresh clone without ../shared.
"""
import json
import pathlib
import sys

SOURCE = pathlib.Path("../shared/contracts/polar-openapi-2026-04.json")
TARGET = pathlib.Path("tests/data/polar-openapi-subset.json")
OPERATIONS = {
    "/v1/customers/external/{external_id}": ["get"],
    "/v1/events/": ["get"],
    "/v1/orders/": ["get"],
    "/v1/refunds/": ["get", "post"],
    "/v1/events/ingest": ["post"],
}
# Webhook deliveries our Polar server sends to the bot (its POST /polar/webhooks): the refund
# outcomes and order refunds the bot acts on, and order.updated, a real Polar event the bot does
# not subscribe to, which stands for "an event type it does not know".
WEBHOOKS = ["refund.created", "refund.updated", "order.refunded", "order.updated"]


def refs(node, found):
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            name = ref.rsplit("/", 1)[1]
            if name not in found:
                found.add(name)
                refs(DOC["components"]["schemas"][name], found)
        for value in node.values():
            refs(value, found)
    elif isinstance(node, list):
        for value in node:
            refs(value, found)


DOC = json.loads(SOURCE.read_text())


def main():
    paths = {p: {m: DOC["paths"][p][m] for m in ms} for p, ms in OPERATIONS.items()}
    webhooks = {t: DOC["webhooks"][t] for t in WEBHOOKS}
    found = set()
    refs(paths, found)
    refs(webhooks, found)
    subset = {
        "openapi": DOC["openapi"],
        "info": DOC["info"],
        "paths": paths,
        "webhooks": webhooks,
        "components": {"schemas": {n: DOC["components"]["schemas"][n] for n in sorted(found)}},
    }
    TARGET.write_text(json.dumps(subset, indent=1, sort_keys=True))
    print(f"{TARGET}: {len(paths)} paths, {len(webhooks)} webhooks, {len(found)} schemas, {TARGET.stat().st_size} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
