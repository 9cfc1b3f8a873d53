"""Synthetic days for the reconciliation benches: a plain day (each instance's records back to back)
and a metering-storm day (every record re-billed by a shifted copy that overlaps it)."""
from __future__ import annotations

import time
from datetime import date, datetime, timedelta, timezone

import psycopg

from bench.common import COPY_RECORDS

ROWS_PER_INSTANCE = 20  # records of one instance on the day (a storm day: 10 and their 10 copies)
LOOK_BACK = timedelta(hours=9)  # more than the default continuous limit + 60 s


def day_start(day: date) -> datetime:
    return datetime.combine(day, datetime.min.time(), timezone.utc)


def write_day(conn, day: date, rows_on_day: int, storm: bool, tag: str, first_id: int) -> int:
    """COPY about rows_on_day records overlapping the day (plus the look-back before it) for
    rows_on_day / 20 instances in orgs of ten; returns the next free id."""
    lo = day_start(day)
    instances = max(rows_on_day // ROWS_PER_INSTANCE, 1)
    base = ROWS_PER_INSTANCE // 2 if storm else ROWS_PER_INSTANCE
    length = timedelta(days=1) / base
    rid = first_id
    with conn.cursor() as cur, cur.copy(COPY_RECORDS) as cp:
        for i in range(instances):
            iid, org, cust = f"i-{tag}{i:05d}", f"o-{tag}{i // 10:04d}", f"c-{tag}{i // 10:04d}"
            t = lo - LOOK_BACK + timedelta(seconds=i % 600)
            while t < lo + timedelta(days=1):
                spans = [(t, t + length)]
                if storm:  # the retry: the same length again, a third later
                    spans.append((t + length / 3, t + length / 3 + length))
                for s, e in spans:
                    hours = (e - s).total_seconds() / 3600
                    cp.write(f"{rid}\t{cust}\t{org}\t{iid}\tsmall\t0.083\t{hours:.4f}\t{0.083 * hours:.4f}\t"
                             f"{s:%Y-%m}\t{s.isoformat()}\t{e.isoformat()}\t{e.isoformat()}\n")
                    rid += 1
                t += length
    return rid


def add_usage(conn, day: date) -> None:
    """instance_usage equal to the billed hours (so usage_mismatch stays quiet)."""
    conn.execute("""
        INSERT INTO instance_usage (org_id, instance_id, date, hours_used)
        SELECT org_id, instance_id, %(d)s::date,
               sum(extract(epoch FROM least(end_time, %(d)s::date + 1) - greatest(start_time, %(d)s::date)) / 3600)
        FROM billing_records
        WHERE tstzrange(start_time, end_time) && tstzrange(%(d)s::date, %(d)s::date + 1)
        GROUP BY org_id, instance_id
        ON CONFLICT DO NOTHING""", {"d": day})


def ensure_days(url: str, shapes: dict[date, tuple[int, bool, str]]) -> None:
    """Write each (rows, storm, tag) day once; a kept --data folder reuses them."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        rid = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM billing_records").fetchone()[0]
        wrote = False
        for day, (rows, storm, tag) in shapes.items():
            if conn.execute("SELECT 1 FROM billing_records WHERE instance_id = %s LIMIT 1",
                            (f"i-{tag}00000",)).fetchone():
                continue
            t0 = time.perf_counter()
            rid = write_day(conn, day, rows, storm, tag, rid)
            add_usage(conn, day)
            wrote = True
            print(f"wrote {day} ({'storm' if storm else 'plain'}, ~{rows:,} rows): {time.perf_counter() - t0:.0f} s",
                  flush=True)
        if wrote:
            conn.execute("ANALYZE")
