"""Checks of every instance a customer or an org was billed for in some periods (SPEC 5
`check customer` / `check org`), and the reads a remediation plan shares with them.

Each instance is checked by the Investigator with the same rules and reads as a single check, a
chunk of CHUNK instances at a time in one database snapshot (`Investigator.check_many`: a few
statements per chunk, not several per instance), CHUNKS_AT_ONCE chunks at once (the pool has 8
connections); Polar's customer is read once per customer and the usage events once per
EVENTS_PER_LISTING customers (PolarMemo). The org's daily limit (SPEC 2.2 step 4)
needs the org's billed time per day: it is read once per org for all of its instances
(`org_intervals_for`) and handed to each instance's check, not read again per instance.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Awaitable, Callable, Iterable

from handlers.coverage import COMPLETE, NO_RECORDS, PARTIAL, Coverage
from handlers.model import KINDS, OrgInterval
from handlers.timeline import hours_text
from services.investigation import CheckReport, Investigator, default_periods
from services.inputs import validate_customer_id, validate_org_id, validate_period

CHUNK = 250  # instances read in one snapshot: a few statements each, of a few thousand rows
CHUNKS_AT_ONCE = 3  # the pool (8) keeps room for Slack's listeners and issuing
ORGS_PER_READ = 500  # orgs whose daily-limit days one statement reads


# --- control-plane reads (the instances billed, and the days their org's limit needs) ------------

def _billed_where(periods: list[str], customer_id: str | None, org_id: str | None) -> tuple[str, list]:
    """The records billed in the periods (of the customer, or of the org, or everyone)."""
    where, args = ["billing_period = ANY(%s)"], [periods]
    for column, value in (("customer_id", customer_id), ("org_id", org_id)):
        if value is not None:
            where.append(f"{column} = %s")
            args.append(value)
    return " AND ".join(where), args


async def instances_billed(db, periods: list[str], *, customer_id: str | None = None,
                           org_id: str | None = None) -> list[str]:
    """Instance ids with records in the periods (of the customer, or the org, or everyone), sorted."""
    where, args = _billed_where(periods, customer_id, org_id)
    async with db.snapshot() as conn:
        cur = await conn.execute(f"SELECT DISTINCT instance_id FROM billing_records WHERE {where}"
                                 " ORDER BY instance_id", args)
        return [r["instance_id"] for r in await cur.fetchall()]


async def instances_by_customer(db, periods: list[str], *, customer_id: str | None = None,
                                org_id: str | None = None) -> dict[str, list[str]]:
    """customer -> the instances with records in the periods (of the customer, or of the org)."""
    where, args = _billed_where(periods, customer_id, org_id)
    async with db.snapshot() as conn:
        cur = await conn.execute(f"SELECT DISTINCT customer_id, instance_id FROM billing_records"
                                 f" WHERE {where} ORDER BY 1, 2", args)
        out: dict[str, list[str]] = {}
        for r in await cur.fetchall():
            out.setdefault(r["customer_id"], []).append(r["instance_id"])
        return out


async def customers_of(db, instance_ids: list[str]) -> list[str]:
    """The customers of these instances (their rows'), each once, in the instances' order."""
    async with db.snapshot() as conn:
        cur = await conn.execute(
            "SELECT i.customer_id FROM unnest(%s::text[]) WITH ORDINALITY AS u(instance_id, n)"
            " JOIN instances i USING (instance_id) ORDER BY u.n", (instance_ids,))
        return list(dict.fromkeys(r["customer_id"] for r in await cur.fetchall()))


def check_periods(inv: Investigator, periods: Iterable[str] | None) -> list[str]:
    return sorted({validate_period(p) for p in periods}) if periods else default_periods(inv.now())


async def org_days(db, instance_ids: list[str], periods: list[str]) -> dict[str, list[datetime]]:
    """Per org, the UTC days on which these instances have records in the periods: a superset of
    the days any of their checks asks the daily limit about (a check's pieces lie inside its
    records). The org is the records' and the instances row's, where they differ, so a check finds
    its org's days whichever it uses."""
    if not instance_ids:
        return {}
    async with db.snapshot() as conn:
        cur = await conn.execute(
            """SELECT DISTINCT o.org_id, d.day
               FROM billing_records r LEFT JOIN instances i ON i.instance_id = r.instance_id
               CROSS JOIN LATERAL (VALUES (r.org_id), (i.org_id)) o(org_id)
               CROSS JOIN LATERAL generate_series(date_trunc('day', r.start_time),
                                                  r.end_time - interval '1 microsecond', interval '1 day') d(day)
               WHERE r.instance_id = ANY(%s) AND r.billing_period = ANY(%s) AND o.org_id IS NOT NULL
               ORDER BY 1, 2""", (instance_ids, periods))
        out: dict[str, list[datetime]] = {}
        for r in await cur.fetchall():
            out.setdefault(r["org_id"], []).append(r["day"])
        return out


async def org_intervals_for(inv: Investigator, days_by_org: dict[str, list[datetime]]
                            ) -> dict[str, list[OrgInterval]]:
    """Each org's daily-limit intervals, read once for all of its instances, ORGS_PER_READ orgs to
    a statement. An org without a daily limit is left out: its checks ask for no days."""
    orgs = sorted(days_by_org)
    out: dict[str, list[OrgInterval]] = {}
    for n in range(0, len(orgs), ORGS_PER_READ):
        group = orgs[n:n + ORGS_PER_READ]
        async with inv.db.snapshot() as conn:
            throttles = await inv.db.throttles(conn, group, inv.config.throttle_defaults)
            wanted = {org: (days_by_org[org], throttles[org][0].daily_limit) for org in group
                      if throttles[org][0].daily_limit is not None}
            out.update(await inv.db.org_intervals_of(conn, wanted))
    return out


async def check_all(inv: Investigator, instance_ids: list[str], periods: list[str],
                    on_report: Callable[[CheckReport], Awaitable[None] | None] | None = None,
                    exclude_case: int | None = None, fingerprint: bool = True,
                    read_customer: bool = True) -> list[CheckReport]:
    """Check every instance, a chunk at a time (at most CHUNKS_AT_ONCE at once), the org's limit
    read once per org. With on_report, each report is handed over as it is done and not kept (a
    plan over thousands of instances keeps only what it adds up). fingerprint=False: a read-only
    answer no case will be opened on (a plan shown before its approval). read_customer=False: the
    customer's name and email are not read from Polar (the letter looks them up when it is written)."""
    async def systematic_counts() -> dict[str, int]:  # the same for every instance: read once
        async with inv.db.snapshot() as conn:
            return await inv.db.systematic_counts(conn, periods)

    async def intervals_of_orgs():
        return await org_intervals_for(inv, await org_days(inv.db, instance_ids, periods))
    memo = inv.polar_memo()

    async def prefetch() -> None:  # every customer's events, EVENTS_PER_LISTING to a listing, from the start
        if memo is not None:
            memo.prefetch_events(await customers_of(inv.db, instance_ids))
    try:
        intervals, systematic, _ = await asyncio.gather(intervals_of_orgs(), systematic_counts(), prefetch())
    except BaseException:
        if memo is not None:
            memo.cancel()  # the listings already asked for: nobody will read them
        raise
    gate = asyncio.Semaphore(CHUNKS_AT_ONCE)
    reports: list[CheckReport] = []

    async def one(chunk: list[str]) -> None:
        async with gate:
            done = await inv.check_many(chunk, periods, exclude_case, org_intervals=intervals, systematic=systematic,
                                        fingerprint=fingerprint, polar_memo=memo, read_customer=read_customer)
        for report in done:
            if on_report is None:
                reports.append(report)
            else:
                handed = on_report(report)
                if asyncio.iscoroutine(handed):
                    await handed

    tasks = [asyncio.ensure_future(one(instance_ids[n:n + CHUNK])) for n in range(0, len(instance_ids), CHUNK)]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        # one chunk failed (or the caller gave up): the check has failed, and the chunks not yet
        # done stop here rather than read on for minutes in the background for nobody
        for t in tasks:
            t.cancel()
        if memo is not None:
            memo.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    reports.sort(key=lambda r: r.result.instance.instance_id)
    return reports


# --- one result over many instances --------------------------------------------------------------

@dataclass
class MultiReport:
    """A customer's result over all of its instances checked (for an org: one per customer)."""

    scope: str  # "customer" or "org"
    scope_id: str
    customer_id: str | None
    periods: list[str]
    reports: list[CheckReport]
    credit_cents: int = 0
    required_level: int = 0
    level_text: str = ""
    coverage: Coverage = field(default_factory=lambda: Coverage(NO_RECORDS))

    @property
    def org_ids(self) -> list[str]:
        return sorted({r.result.instance.org_id for r in self.reports})

    @property
    def systematic_reasons(self) -> list[str]:
        return [f"{r.result.instance.instance_id}: {why}" for r in self.reports for why in r.result.systematic_reasons]

    def kind_totals(self) -> list[dict]:
        """Per kind, the sum of the instances' findings (each rounded in its own check)."""
        out = []
        for kind in KINDS:
            fs = [(r.result.instance.instance_id, f) for r in self.reports for f in r.result.findings if f.kind == kind]
            if not fs:
                continue
            cents = sum(f.credit_cents for _, f in fs)
            hours = sum((f.hours for _, f in fs), Decimal(0))
            out.append({"kind": kind, "credit_cents": cents, "hours": hours_text(hours),
                        "summary": f"{len(fs)} instance{'s' if len(fs) != 1 else ''}: "
                                   + ", ".join(f"{i} {f.credit_cents}" for i, f in fs[:20])
                                   + (", …" if len(fs) > 20 else "") + " (cents)",
                        "evidence": [f"{i}: {f.summary}" for i, f in fs],
                        "record_ids": sorted({rid for _, f in fs for rid in f.record_ids}),
                        "instance_ids": [i for i, _ in fs]})
        return out

    def sources(self) -> dict[str, str]:
        """Each source 'ok' when every instance's check read it, else what failed and for how many."""
        out = {}
        for name in ("database", "kubernetes", "polar"):
            states = [r.sources.get(name, "ok") for r in self.reports]
            bad = [s for s in states if s != "ok"]
            if not bad:
                out[name] = "ok"
            elif len(set(bad)) == 1 and len(bad) == len(states):
                out[name] = bad[0]
            else:
                out[name] = f"{bad[0]} (for {len(bad)} of {len(states)} instances)"
        return out

    def as_json(self) -> dict:
        orgs = self.org_ids
        return {
            "coverage": self.coverage.as_json(),
            "scope": self.scope,
            "instance_id": None,
            "org_id": self.scope_id if self.scope == "org" else (orgs[0] if len(orgs) == 1 else None),
            "customer_id": self.customer_id,
            "periods": self.periods,
            "findings": self.kind_totals(),
            "credit_cents": self.credit_cents,
            "required_level": self.required_level,
            "systematic": any(r.result.systematic for r in self.reports),
            "sources": self.sources(),
            "instances": [{"instance_id": r.result.instance.instance_id, "org_id": r.result.instance.org_id,
                           "findings": [f.as_json() for f in r.result.findings],
                           "credit_cents": r.result.credit_cents,
                           "coverage": r.coverage.as_json(),
                           "credited_before": r.result.credited_before,
                           "notes": r.result.notes}
                          for r in self.reports],
            # beyond the SPEC's keys
            "org_ids": orgs,
            "systematic_reasons": self.systematic_reasons,
        }


def combine_coverage(reports: list[CheckReport], periods: list[str], who: str) -> Coverage:
    """No instance billed: no records. Else partial when any instance's check was, naming the
    kinds and, per reason, the instances it holds for (each reason still starts with its kind)."""
    if not reports:
        return Coverage(NO_RECORDS, (), (f"no billing records for {who} in {', '.join(periods)}: "
                                         "there is no charge to judge",))
    partial = [r for r in reports if r.coverage.state == PARTIAL]
    if not partial:
        if all(r.coverage.state == NO_RECORDS for r in reports):
            return Coverage(NO_RECORDS, (), (f"no billing records for {who} in {', '.join(periods)}: "
                                             "there is no charge to judge",))
        return Coverage(COMPLETE)
    kinds = tuple(k for k in KINDS if any(k in r.coverage.kinds for r in partial))
    by_why: dict[str, list[str]] = {}
    for r in partial:
        for why in r.coverage.why:
            by_why.setdefault(why, []).append(r.result.instance.instance_id)
    why = tuple(f"{w} ({'instance' if len(ids) == 1 else 'instances'} {', '.join(ids[:10])}"
                f"{', …' if len(ids) > 10 else ''})"
                for k in kinds for w, ids in by_why.items() if w.startswith(k + ":"))
    return Coverage(PARTIAL, kinds, why)


def multi_report(inv: Investigator, scope: str, scope_id: str, customer_id: str | None, periods: list[str],
                 reports: list[CheckReport], who: str | None = None) -> MultiReport:
    """One result over the instances' reports: the credit and level are the sums'. `who` names
    what had no records, when nothing was billed (default: the customer, or the org)."""
    credit = sum(r.result.credit_cents for r in reports)
    level = inv.config.required_level(credit)
    who = who or (f"customer {customer_id}" if scope == "customer" else f"org {scope_id}")
    return MultiReport(scope=scope, scope_id=scope_id, customer_id=customer_id, periods=periods, reports=reports,
                       credit_cents=credit, required_level=level, level_text=inv.config.level_label(level),
                       coverage=combine_coverage(reports, periods, who))


async def check_customer(inv: Investigator, customer_id: str, periods: list[str] | None = None) -> MultiReport:
    customer_id = validate_customer_id(customer_id)
    periods = check_periods(inv, periods)
    reports = await check_all(inv, await instances_billed(inv.db, periods, customer_id=customer_id), periods)
    return multi_report(inv, "customer", customer_id, customer_id, periods, reports)


async def check_org(inv: Investigator, org_id: str, periods: list[str] | None = None) -> list[MultiReport]:
    """One result per customer the org's instances belong to (a case is one customer's: its
    credit goes to that customer's orders). Nothing billed: one result saying so."""
    org_id = validate_org_id(org_id)
    periods = check_periods(inv, periods)
    reports = await check_all(inv, await instances_billed(inv.db, periods, org_id=org_id), periods)
    by_customer: dict[str, list[CheckReport]] = {}
    for r in reports:
        by_customer.setdefault(r.result.instance.customer_id, []).append(r)
    if not by_customer:
        return [multi_report(inv, "org", org_id, None, periods, [])]
    return [multi_report(inv, "org", org_id, cust, periods, rs) for cust, rs in sorted(by_customer.items())]
