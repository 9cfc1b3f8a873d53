"""Polar API client (https://api.polar.sh), Polar-Version pinned.

Reads and event ingests retry on 429 (honouring Retry-After), 5xx and timeouts. A refund POST is
never retried here: refunds have no idempotency key, so the issuing service looks the refund up
before it would ever send another (SPEC 4).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential, wait_random

from handlers.model import UsageEvent
from handlers.timeline import fmt_money, to_us

log = logging.getLogger(__name__)

PAGE_LIMIT = 100
MAX_RETRY_AFTER_S = 30.0
PAGE_CONCURRENCY = 8
# Events listed oldest first: Polar's default is newest first, where an event metered while the
# pages are read shifts every later page by one (page 2 repeats page 1's last, the last page's
# last falls off the end: missed, and the check would say "ok"). Oldest first, new events land
# after everything already listed.
EVENTS_OLDEST_FIRST = "timestamp"


class PolarError(Exception):
    def __init__(self, status: int, error: str, detail: Any):
        self.status, self.error, self.detail = status, error, detail
        super().__init__(f"Polar {status} {error}: {detail}")


class PolarNotFound(PolarError):
    pass


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None, rate_limited: bool = False):
        super().__init__(reason)
        self.retry_after = retry_after
        self.rate_limited = rate_limited


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_S)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
            return min(max((when - datetime.now(timezone.utc)).total_seconds(), 0.0), MAX_RETRY_AFTER_S)
        except (TypeError, ValueError):
            return None


def _error(response: httpx.Response) -> PolarError:
    try:
        body = response.json()
        error, detail = body.get("error", response.reason_phrase), body.get("detail")
    except ValueError:
        error, detail = response.reason_phrase, response.text[:200]
    cls = PolarNotFound if response.status_code == 404 else PolarError
    return cls(response.status_code, str(error), detail)


class _Wait:
    """Exponential backoff with jitter, except that a 429's Retry-After is honoured exactly."""

    def __init__(self, base: float):
        # base x 2^n capped at 8 s, plus up to `base` of jitter. (wait_exponential_jitter's `initial` is
        # deprecated in tenacity 9 and its replacement is missing from older versions: this works in both.)
        self.backoff = wait_exponential(multiplier=base, max=8) + wait_random(0, base)

    def __call__(self, state) -> float:
        exc = state.outcome.exception()
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            return exc.retry_after
        return self.backoff(state)


@dataclass
class Customer:
    id: str
    external_id: str | None
    email: str | None
    name: str | None


class PolarClient:
    def __init__(self, base_url: str, token: str | None, *, api_version: str = "2026-04", timeout: float = 10.0,
                 attempts: int = 4, backoff: float = 0.25, transport: httpx.AsyncBaseTransport | None = None):
        headers = {"Polar-Version": api_version, "Accept": "application/json", "User-Agent": "billing-bot"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.timeout_s = timeout  # how long one call can take: the issuer waits this out before a re-POST
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout, transport=transport,
                                       headers=headers)
        self.attempts = attempts
        self.backoff = backoff
        # Polar's rate limit is per organisation token, not per call: a 429 to one worker pauses
        # every call of this client until the Retry-After passes, so a batch slows down as a whole
        # instead of each worker finding the limit again.
        self._paused_until = 0.0
        self.rate_limited = 0  # 429s seen (the batch bench reports them)

    async def close(self) -> None:
        await self._http.aclose()

    async def wait_rate_limit(self) -> None:
        """Wait out the pause the last 429 set (the issuer does, right before it records a refund
        POST's attempt: services/issuing.py)."""
        wait = self._paused_until - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    async def _send_once(self, method: str, path: str, *, pause: bool = True, **kw) -> httpx.Response:
        if pause:
            await self.wait_rate_limit()
        try:
            response = await self._http.request(method, path, **kw)
        except httpx.TimeoutException as exc:
            raise _Retryable(f"timeout: {type(exc).__name__}") from exc
        except httpx.TransportError as exc:
            raise _Retryable(f"connection: {type(exc).__name__}") from exc
        if response.status_code == 429:
            self.rate_limited += 1
            after = _retry_after(response)
            self._paused_until = max(self._paused_until, time.monotonic() + (after if after is not None else 1.0))
            raise _Retryable("429 Too Many Requests", after, rate_limited=True)
        if response.status_code >= 500:
            raise _Retryable(f"{response.status_code} {response.reason_phrase}", _retry_after(response))
        return response

    async def request(self, method: str, path: str, *, retry: bool = True, pause: bool = True, **kw) -> Any:
        """One call; retried (429/5xx/timeouts) when retry is true. Returns the JSON body.
        pause=False: sent at once even while a 429's pause lasts (the caller waited it out)."""
        attempts = self.attempts if retry else 1
        try:
            async for attempt in AsyncRetrying(stop=stop_after_attempt(attempts), wait=_Wait(self.backoff),
                                               retry=retry_if_exception(lambda e: isinstance(e, _Retryable)),
                                               reraise=True):
                with attempt:
                    response = await self._send_once(method, path, pause=pause, **kw)
        except _Retryable as exc:
            raise PolarUnavailable(str(exc), exc.retry_after, exc.rate_limited) from exc
        if response.status_code >= 400:
            raise _error(response)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    # --- reads ---------------------------------------------------------------------------------

    async def customer_by_external_id(self, external_id: str) -> Customer:
        body = await self.request("GET", f"/v1/customers/external/{_quote(external_id)}")
        return Customer(body["id"], body.get("external_id"), body.get("email"), body.get("name"))

    async def list_all(self, path: str, params: dict[str, Any]) -> list[dict]:
        """Every item of a paginated list, each once: page 1 first, then the remaining pages
        concurrently. Items added while the pages are read shift the later pages: an item already
        read comes again (kept once, by id) and the last ones move past the last page page 1
        announced, so the pages a later answer announces are read too, until none is new."""
        params = {**params, "limit": PAGE_LIMIT}
        first = await self.request("GET", path, params={**params, "page": 1})
        items = list(first.get("items", []))
        pagination = first.get("pagination") or {}
        if "max_page" in pagination:
            gate = asyncio.Semaphore(PAGE_CONCURRENCY)

            async def page(n: int) -> dict:
                async with gate:
                    return await self.request("GET", path, params={**params, "page": n})

            read, last = 1, int(pagination["max_page"])
            while last > read:
                bodies = await asyncio.gather(*(page(n) for n in range(read + 1, last + 1)))
                read = last
                for body in bodies:
                    items.extend(body.get("items", []))
                    last = max(last, int((body.get("pagination") or {}).get("max_page", 0)))
        else:  # cursor pagination: walk while the server says there is more
            n = 1
            while pagination.get("has_next_page"):
                n += 1
                body = await self.request("GET", path, params={**params, "page": n})
                items.extend(body.get("items", []))
                pagination = body.get("pagination") or {}
        return _once_by_id(items)

    async def usage_events(self, external_customer_id: str, name: str, instance_id: str) -> list[UsageEvent]:
        """The metering events of one instance. The metadata filter narrows the listing; the
        instance is checked again here, so a server that ignores the filter is still read right."""
        raw = await self.list_all("/v1/events/", {
            "external_customer_id": external_customer_id, "name": name,
            "metadata[instance_id]": instance_id, "sorting": EVENTS_OLDEST_FIRST})
        return parse_usage_events(raw, name, instance_id)

    async def usage_events_of_customers(self, external_customer_ids: list[str], name: str
                                        ) -> dict[str, dict[str, list[UsageEvent]]]:
        """customer -> instance -> its metering events, for several customers in one listing (the
        filter takes a list): a check over thousands of instances reads Polar a few dozen times,
        not once per instance. Each event is placed by its own customer and instance."""
        raw = await self.list_all("/v1/events/", {"external_customer_id": list(external_customer_ids), "name": name,
                                                  "sorting": EVENTS_OLDEST_FIRST})
        wanted = set(external_customer_ids)
        by_key: dict[tuple[str, str], list[dict]] = {}
        for ev in raw:
            instance = (ev.get("metadata") or {}).get("instance_id")
            if ev.get("external_customer_id") in wanted and isinstance(instance, str):
                by_key.setdefault((ev["external_customer_id"], instance), []).append(ev)
        out: dict[str, dict[str, list[UsageEvent]]] = {c: {} for c in external_customer_ids}
        for (customer, instance), evs in by_key.items():
            out[customer][instance] = parse_usage_events(evs, name, instance)
        return out

    async def orders(self, external_customer_id: str) -> list[dict]:
        return await self.list_all("/v1/orders/", {"external_customer_id": external_customer_id,
                                                   "sorting": "created_at"})

    async def refunds_for_order(self, order_id: str) -> list[dict]:
        """Every refund of the order, whatever its status (all pages)."""
        return await self.list_all("/v1/refunds/", {"order_id": order_id})

    async def refund(self, refund_id: str) -> dict:
        """One refund by id. Polar has no GET /v1/refunds/{id}: the list filters by `id`.
        Raises PolarNotFound when Polar lists no such refund."""
        body = await self.request("GET", "/v1/refunds/", params={"id": refund_id, "limit": 1})
        for item in body.get("items", []):
            if item.get("id") == refund_id:  # checked again: a server ignoring the filter is still read right
                return item
        raise PolarNotFound(404, "ResourceNotFound", f"no refund {refund_id}")

    async def events_with_metadata(self, external_customer_id: str, name: str, key: str, value: str) -> list[dict]:
        """The customer's events named `name` whose metadata[key] is `value` (e.g. the
        compensating usage events of one case: key case_id), checked again here."""
        raw = await self.list_all("/v1/events/", {"external_customer_id": external_customer_id, "name": name,
                                                  f"metadata[{key}]": value, "sorting": EVENTS_OLDEST_FIRST})
        return [e for e in raw if e.get("name") == name and str((e.get("metadata") or {}).get(key)) == str(value)]

    # --- writes --------------------------------------------------------------------------------

    async def create_refund(self, body: dict) -> dict:
        """POST /v1/refunds/ exactly once: no retry, whatever happens (the caller looks it up).
        Sent at once, never held by a 429's pause: the caller waits the pause out before it records
        the attempt, so the POST ends within the client's timeout of it (the in-flight window
        another replica waits out before it looks the refund up and posts again)."""
        return await self.request("POST", "/v1/refunds/", json=body, retry=False, pause=False)

    async def ingest_events(self, events: list[dict]) -> dict:
        """Events are deduplicated on external_id, so retrying an ingest is harmless."""
        return await self.request("POST", "/v1/events/ingest", json={"events": events})


class PolarUnavailable(Exception):
    """Polar did not answer usefully after the retries (timeouts, 429s, 5xx). The request may or
    may not have taken effect."""

    def __init__(self, reason: str, retry_after: float | None = None, rate_limited: bool = False):
        super().__init__(reason)
        self.retry_after = retry_after
        self.rate_limited = rate_limited  # the last answer was 429: Polar turned the call away


# --- what Polar's answers mean to a support agent ---------------------------------------------------

def refund_failure_reason(exc: PolarError) -> str:
    """A refund POST that Polar refused, in words a support agent acts on: what happened, that no
    money moved, and the next step. The bodies are Polar's: 403 RefundedAlready and 422
    HTTPValidationError are in its OpenAPI document; its server also answers 403 RefundsBlocked
    (a disputed payment) and 400 RefundAmountTooHigh, which the document does not list."""
    detail = _detail_text(exc.detail)
    if exc.status == 403 and exc.error == "RefundedAlready":
        return ("Polar says this order is already fully refunded, so no more money can go back on it; nothing was "
                "refunded now. Next: look at the order's refunds in Polar (a person, or Polar itself to stop a "
                "chargeback, refunded it already); if the customer is still owed this credit, issue it as invoice "
                "credit instead.")
    if exc.status == 403 and ("block" in detail.lower() or "disput" in detail.lower() or exc.error == "RefundsBlocked"):
        return ("Polar blocks refunds on this order because the customer disputed the payment (a chargeback is "
                "open); nothing was refunded. Next: do not retry. Ask billing engineering to settle the dispute in "
                "Polar first; only then issue what is still owed, as invoice credit, so the customer is not paid twice.")
    if (exc.status in (400, 422) and _exceeds(exc)) or exc.error == "RefundAmountTooHigh":
        left = _trailing_cents(detail)
        can = f" (Polar says {fmt_money(left)} is left on it)" if left is not None else ""
        return (f"The credit is more than this order can still refund{can}; nothing was refunded. Next: refund at "
                "most what the order can still take and issue the rest as invoice credit, or lower the credit.")
    if exc.status == 403:
        return (f"Polar refused the refund (403 {exc.error}: {detail}); nothing was refunded. Next: ask billing "
                "engineering to check that the bot's Polar token may create refunds (scope refunds:write).")
    if exc.status == 422:
        return (f"Polar rejected the refund request as invalid ({detail}); nothing was refunded. This is a fault "
                "in the bot, not in the case: do not retry, tell billing engineering.")
    if exc.status == 404:
        return (f"Polar does not know this order ({detail}); nothing was refunded. Next: check the customer's "
                "orders in Polar; if the order is gone, issue the credit as invoice credit.")
    return (f"Polar refused the refund ({exc.status} {exc.error}: {detail}); nothing was refunded. Next: retry "
            "later; if it keeps failing, tell billing engineering.")


def refund_status_reason(status: str, amount_cents: int, order_id: str) -> str:
    """What a refund's status means for the case, for the thread and the approver."""
    amount = fmt_money(amount_cents)
    if status == "succeeded":
        return f"Polar refunded {amount} on order {order_id}: the money went back to the customer."
    if status == "pending":
        return (f"Refund pending: Polar accepted the refund of {amount} on order {order_id}, but the money has not "
                "moved yet. The customer is told only once Polar reports it succeeded.")
    if status == "failed":
        return (f"Polar reports the refund of {amount} on order {order_id} failed: the payment processor could not "
                "return the money (a closed or expired card, for example), so the customer got nothing. Next: "
                "offer the amount as invoice credit (it appears on the next invoice).")
    if status == "canceled":
        return (f"Polar reports the refund of {amount} on order {order_id} was canceled before any money moved. "
                "Next: offer the amount as invoice credit (it appears on the next invoice).")
    return f"Polar reports the refund of {amount} on order {order_id} as {status!r}, which the bot does not know."


def _detail_text(detail: Any) -> str:
    """Polar's detail: a string, or FastAPI's list of {loc, msg, type}."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(x) for x in item.get("loc", []) if x != "body")
                parts.append(f"{loc}: {item.get('msg')}" if loc else str(item.get("msg")))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return "" if detail is None else str(detail)


def _exceeds(exc: PolarError) -> bool:
    text = _detail_text(exc.detail).lower()
    return any(w in text for w in ("exceed", "refundable", "remaining order balance"))


def _trailing_cents(text: str) -> int | None:
    """RefundAmountTooHigh ends with the order's refundable amount in cents."""
    tail = text.rstrip(". ").rsplit(":", 1)
    if len(tail) == 2 and tail[1].strip().isdigit():
        return int(tail[1].strip())
    return None


def _quote(value: str) -> str:
    return quote(value, safe="")


def _once_by_id(items: list[dict]) -> list[dict]:
    """Each item once (the first time its id is seen); items without an id are all kept."""
    seen: set[str] = set()
    out = []
    for item in items:
        key = item.get("id")
        if key is not None:
            if str(key) in seen:
                continue
            seen.add(str(key))
        out.append(item)
    return out


def parse_usage_events(raw: list[dict], name: str, instance_id: str) -> list[UsageEvent]:
    """The instance's metering events, each once (list_all already keeps each id once; kept here
    too because a repeated event would be an extra metering event: a billed hour credited)."""
    out = []
    seen: set[str] = set()
    for ev in raw:
        md = ev.get("metadata") or {}
        if ev.get("name") != name or md.get("instance_id") != instance_id:
            continue
        if ev.get("id") is not None:
            if str(ev["id"]) in seen:
                continue
            seen.add(str(ev["id"]))
        try:
            start, end = _iso(md["start_time"]), _iso(md["end_time"])
        except (KeyError, ValueError, TypeError):
            log.warning("Polar event %s has no readable start_time/end_time; skipped", ev.get("id"))
            continue
        rid = md.get("record_id")
        try:
            rid = int(rid) if rid is not None else None
        except (TypeError, ValueError):
            rid = None
        out.append(UsageEvent(str(ev.get("id")), instance_id, start, end, rid))
    return out


def _iso(value: str) -> int:
    dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return to_us(dt)
