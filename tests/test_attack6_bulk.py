"""Attack 6 on the bulk checks (Investigator.check_many, multi_check.check_all, PolarMemo's
listings of several customers, the multi-org org_days.sql, records_of, evidence_fingerprints,
held_pieces_of): each answer held to what a single check (or the statement it replaced) gives."""
from __future__ import annotations

import asyncio
import random
from datetime import datetime, timedelta, timezone

import pytest

from services import investigation, multi_check
from services.db import Database
from services.investigation import Investigator
from services.multi_check import check_all
from services.polar import PolarClient

from .fakes.polar_server import TOKEN
from .seed import instance, record
from .test_remediation_batch import CONFIG

PERIODS = ["2026-10"]
EVENT = "compute_hours"


def _hourly(db, polar, customers: int, hours: int, *, rid: int = 1) -> int:
    """One instance per customer, `hours` clean hours in October, two hours apart (no finding of
    any kind), each hour metered once in Polar."""
    for c in range(customers):
        cust, iid, org = f"c-{c:02d}", f"i-{c:02d}", f"o-{c:02d}"
        polar.add_customer(cust, email=f"{cust}@example.com")
        instance(db, iid, org=org, customer=cust, tier="gpu", created="2026-09-01 00:00")
        t = datetime(2026, 10, 5, tzinfo=timezone.utc)
        for h in range(hours):
            s, e = t + timedelta(hours=3 * h), t + timedelta(hours=3 * h + 1)
            record(db, rid, iid, s.strftime("%Y-%m-%d %H:%M"), e.strftime("%Y-%m-%d %H:%M"), "2.08",
                   org=org, customer=cust)
            polar.add_usage_event(cust, EVENT, {"instance_id": iid, "start_time": s.isoformat(),
                                                "end_time": e.isoformat(), "record_id": str(rid)})
            rid += 1
    return rid


async def _with_inv(db_url, polar, body):
    dbx = await Database.connect(db_url)
    client = PolarClient(polar.url, TOKEN, backoff=0.01)
    try:
        return await body(Investigator(CONFIG, dbx, polar=client))
    finally:
        await client.close()
        await dbx.close()


# --- Polar: a listing of several customers is paged; Polar adds events while it is read ---------------

def test_an_event_metered_while_a_listing_is_paged_is_not_counted_twice(db, db_url, polar, monkeypatch):
    """Polar lists events newest first, by page number. A metering event ingested between page 1
    and page 2 (a running instance of any of the listing's 40 customers) pushes page 1's last event
    onto page 2: the listing returns it twice. Counted twice it is an "extra metering event" and
    credits a whole billed hour that was metered once."""
    _hourly(db, polar, customers=3, hours=50)  # 150 events: two pages of 100
    real_page = polar._page
    shifted = []

    def page_then_meter(req, items):
        resp = real_page(req, items)
        if req.path == "/v1/events/" and req.q("page", "1") == "1" and not shifted:
            # a new event, newest first: at the head of the listing
            new = polar.add_usage_event("c-00", EVENT, {"instance_id": "i-new", "start_time": "2026-10-31T23:00:00",
                                                        "end_time": "2026-11-01T00:00:00"})
            polar.events.remove(new)
            polar.events.insert(0, new)
            shifted.append(new)
        return resp
    monkeypatch.setattr(polar, "_page", page_then_meter)

    reports = asyncio.run(_with_inv(db_url, polar, lambda inv: check_all(inv, ["i-00", "i-01", "i-02"], PERIODS)))
    assert shifted, "the listing was not paged"
    assert all(r.sources["polar"] == "ok" for r in reports)
    assert [(r.result.instance.instance_id, r.result.credit_cents, [f.kind for f in r.result.findings])
            for r in reports] == [("i-00", 0, []), ("i-01", 0, []), ("i-02", 0, [])]
