"""Gather a case's evidence from the database, Kubernetes and Polar at once, then run the rules.

The database is required (it knows the instance and its records); Kubernetes and Polar are
evidence: when one fails or times out, `sources` says why and the case goes on without it.
"""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Awaitable, Callable

from handlers.coverage import Coverage, Evidence, coverage
from handlers.model import CheckInput, CheckResult, LogEvent, OrgInterval, Pod, UsageEvent
from handlers.pipeline import days_for_daily_limit, finish, first_steps
from handlers.timeline import HOUR_US, fmt_duration, from_us
from services.config import Config
from services.db import Database
from services.kube import KubeSource, describe_error
from services.inputs import UnknownInstance, validate_instance_id, validate_period
from services.polar import Customer, PolarClient, PolarNotFound
from handlers.orders import refund_room
from services.store import evidence_fingerprint, held_pieces

SOURCE_TIMEOUT_S = 20.0


def default_periods(now: datetime) -> list[str]:
    """The current and the previous billing period (UTC months)."""
    y, m = now.year, now.month
    py, pm = (y, m - 1) if m > 1 else (y - 1, 12)
    return [f"{py:04d}-{pm:02d}", f"{y:04d}-{m:02d}"]


@dataclass
class CheckReport:
    result: CheckResult
    sources: dict[str, str]
    customer: Customer | None
    throttle_text: str
    coverage: Coverage  # what could be judged; first in every output (SPEC 5)
    fingerprint: str = ""  # of the database evidence, read in the same snapshot (SPEC 2.2)
    refund_room: dict | None = None  # per period: the invoicing order and what it can still refund
    holders: tuple[int, ...] = ()  # the other cases holding the instance's time when it was read

    def as_json(self) -> dict:
        r = self.result
        return {
            "coverage": self.coverage.as_json(),
            "instance_id": r.instance.instance_id,
            "org_id": r.instance.org_id,
            "customer_id": r.instance.customer_id,
            "periods": r.periods,
            "findings": [f.as_json() for f in r.findings],
            "credit_cents": r.credit_cents,
            "required_level": r.required_level,
            "systematic": r.systematic,
            "sources": self.sources,
            # Beyond the SPEC's keys: what an agent or auditor also wants to see.
            "systematic_reasons": r.systematic_reasons,
            "true_tier": r.true_tier,
            "true_tier_source": r.true_tier_source,
            "notes": r.notes,
            "credited_before": r.credited_before,
            "credit_by_period": r.credit_by_period,
            "refund_room": self.refund_room,
            "customer": ({"name": self.customer.name, "email": self.customer.email, "polar_id": self.customer.id}
                         if self.customer else None),
        }


class PolarMemo:
    """Per customer, the Polar reads every instance's check of that customer shares within one
    run over many instances (a customer or org check, a remediation plan): the customer and its
    orders are read once per customer, not once per instance. The usage events stay per instance
    (each check reads its own instance's). Concurrent checks of one customer share one call."""

    def __init__(self, polar: PolarClient):
        self.polar = polar
        self._calls: dict[tuple[str, str], asyncio.Task] = {}

    def _once(self, what: str, customer_id: str, make) -> asyncio.Task:
        key = (what, customer_id)
        if key not in self._calls:
            task = asyncio.ensure_future(make())
            # every check that awaited it may have given up (its source timeout) before it ends:
            # its failure is then nobody's, and must not be logged as "never retrieved"
            task.add_done_callback(_retrieve)
            self._calls[key] = task
        return self._calls[key]

    async def customer(self, customer_id: str) -> Customer:
        return await asyncio.shield(self._once("customer", customer_id,
                                               lambda: self.polar.customer_by_external_id(customer_id)))

    async def orders(self, customer_id: str) -> list[dict]:
        return await asyncio.shield(self._once("orders", customer_id, lambda: self.polar.orders(customer_id)))


class Investigator:
    def __init__(self, config: Config, db: Database, *, kube: KubeSource | None = None,
                 kube_problem: str | None = None, polar: PolarClient | None = None,
                 polar_problem: str | None = None, now: Callable[[], datetime] | None = None):
        self.config = config
        self.db = db
        self.kube = kube
        self.kube_problem = kube_problem or ("not configured" if kube is None else None)
        self.polar = polar
        self.polar_problem = polar_problem or ("not configured" if polar is None else None)
        self.now = now or (lambda: datetime.now(timezone.utc))

    async def check(self, instance_id: str, periods: list[str] | None = None,
                    exclude_case: int | None = None, *,
                    org_intervals: dict[str, list[OrgInterval]] | None = None,
                    systematic: dict[str, int] | None = None, fingerprint: bool = True,
                    polar_memo: PolarMemo | None = None,
                    db_gate: asyncio.Semaphore | None = None) -> CheckReport:
        """exclude_case: a case checked again (its own pieces do not count as held by another).
        org_intervals: the daily-limit intervals of orgs already read once for many instances
        (services/multi_check.py), by org id, covering every day the instance has records on in
        the periods; an org not in it is read here, as for a single check. systematic: the
        latest reconciled day's counts, read once for many instances. fingerprint=False: a
        read-only answer no case will be opened on (a plan shown before its approval) skips it."""
        instance_id = validate_instance_id(instance_id)
        periods = sorted({validate_period(p) for p in periods}) if periods else default_periods(self.now())
        sources = {"database": "ok", "kubernetes": "ok", "polar": "ok"}

        async with db_gate or contextlib.nullcontext(), self.db.snapshot() as conn:
            inst = await self.db.instance(conn, instance_id)
            if inst is None:
                inst = await self.db.instance_from_records(conn, instance_id)
            if inst is None:
                raise UnknownInstance(f"unknown instance {instance_id!r}: no such instance in the control-plane database")

            # Kubernetes and Polar run while the database is read.
            kube_task = asyncio.create_task(self._kube(inst))
            polar_task = asyncio.create_task(self._polar(inst.customer_id, instance_id, polar_memo))

            # only the history that can change the checked periods (a run reaching into them, the
            # records overlapping theirs), not every record the instance ever had
            records = await self.db.records(conn, instance_id, periods)
            throttle, from_row = await self.db.throttle(conn, inst.org_id, self.config.throttle_defaults)
            covers, prior_cases = await held_pieces(conn, self.db.schema, instance_id, exclude_case)
            fingerprint = (await evidence_fingerprint(conn, self.db.schema, instance_id, inst.org_id, periods)
                           if fingerprint else "")
            systematic_counts = systematic if systematic is not None else await self.db.systematic_counts(conn,
                                                                                                          periods)

            # Steps 1-3 need the stop windows from Kubernetes; the daily limit then needs the org's
            # totals only on the days where this instance still has billed time.
            pods, events, sources["kubernetes"], kube_problems = await kube_task
            case = CheckInput(
                instance=inst, records=records, periods=periods, throttle=throttle,
                rate_card=self.config.rate_card, pods=pods, log_events=events, prior_covers=covers,
                prior_cases=prior_cases, systematic_kinds=systematic_counts,
                systematic_min_customers=self.config.systematic_min_customers)
            walk = first_steps(case)
            days = [from_us(d) for d in days_for_daily_limit(walk)]
            if not days:
                intervals = None
            elif org_intervals is not None and inst.org_id in org_intervals:
                intervals = org_intervals[inst.org_id]
            else:
                intervals = await self.db.org_intervals(conn, inst.org_id, days, throttle.daily_limit)

        customer, usage, sources["polar"], polar_notes, orders = await polar_task
        case.polar_events = usage
        result = finish(walk, intervals)
        result.required_level = self.config.required_level(result.credit_cents)
        result.notes.extend(polar_notes)
        thr_text = (f"continuous {fmt_duration(throttle.continuous_limit)}, daily {fmt_duration(throttle.daily_limit)}, "
                    f"idle {fmt_duration(throttle.idle_timeout)}" + ("" if from_row else " (defaults: no throttle_settings row)"))
        cov = coverage(Evidence(
            periods=tuple(periods),
            records_in_periods=sum(1 for r in records if r.billing_period in periods),
            pods_problem=kube_problems["pods"], logs_problem=kube_problems["logs"],
            polar_problem=None if usage is not None else sources["polar"],
            tier_from_pod=any(p.tier for p in pods), true_tier=result.true_tier,
            tier_on_card=result.true_tier in self.config.rate_card,
            finding_kinds=frozenset(f.kind for f in result.findings)))
        return CheckReport(result=result, sources=sources, customer=customer, throttle_text=thr_text, coverage=cov,
                          fingerprint=fingerprint,
                          refund_room=refund_room(orders, list(periods)) if orders is not None else None,
                          holders=tuple(sorted(pc.case_id for pc in prior_cases)))

    async def _kube(self, inst) -> tuple[list[Pod], list[LogEvent], str, dict[str, str | None]]:
        """Pods, log events, the source's status, and per part (pods, logs) why it was not read."""
        if self.kube is None:
            problem = self.kube_problem or "not configured"
            return [], [], problem, {"pods": problem, "logs": problem}
        since = inst.created_at - HOUR_US if inst.created_at is not None else None
        pods_r, logs_r = await asyncio.gather(
            _bounded(self.kube.instance_pods(inst.instance_id)),
            _bounded(self.kube.control_plane_events(since)), return_exceptions=True)
        problems = []
        parts: dict[str, str | None] = {"pods": None, "logs": None}
        pods: list[Pod] = []
        events: list[LogEvent] = []
        if isinstance(pods_r, BaseException):
            problems.append(f"instance pods: {describe_error(pods_r)}")
            parts["pods"] = "failed: " + problems[-1]
        else:
            pods = pods_r
        if isinstance(logs_r, BaseException):
            problems.append(f"control-plane logs: {describe_error(logs_r)}")
            parts["logs"] = "failed: " + problems[-1]
        else:
            events = logs_r[0]
        return pods, events, ("failed: " + "; ".join(problems)) if problems else "ok", parts

    async def _polar(self, customer_id: str, instance_id: str, memo: PolarMemo | None = None
                     ) -> tuple[Customer | None, list[UsageEvent] | None, str, list[str], list[dict] | None]:
        """The customer (for the email), the instance's metering events (for duplicates) and the
        customer's orders (what each can still refund). The events are the evidence: the source is
        'ok' when they were read."""
        if self.polar is None:
            return None, None, self.polar_problem or "not configured", [], None
        reads = memo or self.polar
        cust_r, events_r, orders_r = await asyncio.gather(
            _bounded(reads.customer(customer_id) if memo else self.polar.customer_by_external_id(customer_id)),
            _bounded(self.polar.usage_events(customer_id, self.config.polar.usage_event_name, instance_id)),
            _bounded(reads.orders(customer_id)),
            return_exceptions=True)
        # what each order can still refund, shown before approval (not evidence: a failure is a note)
        orders = None if isinstance(orders_r, BaseException) else orders_r
        notes = []
        customer = None
        if isinstance(cust_r, PolarNotFound):
            notes.append(f"Polar has no customer with external id {customer_id}: no name or email for the letter")
        elif isinstance(cust_r, BaseException):
            notes.append(f"Polar customer lookup failed: {_describe(cust_r)}")
        else:
            customer = cust_r
        if isinstance(events_r, BaseException):
            return customer, None, f"failed: usage events: {_describe(events_r)}", notes, orders
        return customer, events_r, "ok", notes, orders


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


async def _bounded(coro: Awaitable):
    return await asyncio.wait_for(coro, SOURCE_TIMEOUT_S)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"timed out after {SOURCE_TIMEOUT_S:.0f} s"
    return f"{type(exc).__name__}: {exc}"
