"""Daily reconciliation (SPEC 5.2): set-based SQL over the control-plane database for one UTC day.

The statement in sql/reconcile.sql finds every anomaly kind at once; this module runs it, rounds
each anomaly's overcharge to cents, totals by kind, and records which finding kinds were seen for
how many customers (the systematic rule of SPEC 2.4 reads that, so it is never computed twice).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path

from psycopg.rows import tuple_row

from handlers.timeline import fmt_money, to_cents
from services.config import Config
from services.inputs import InputError, validate_day

SQL = (Path(__file__).parent / "sql" / "reconcile.sql").read_text()
RECONCILE_TIMEOUT_MS = 600_000
RECONCILE_WORK_MEM = "64MB"
# rows of the day one statement takes at most: measured to stay within RECONCILE_WORK_MEM on plain
# and metering-storm days (bench/storm_bench.py). Each partition reads the day's index entries again,
# so smaller partitions cost more scans (100k-150k were alike at 400k rows, 50k slower); 120k keeps
# a quarter of a 400k day, a shard of four, in one statement.
PARTITION_ROWS = 120_000
# the day's rows of this shard, to choose the number of partitions (the GiST index answers it)
COUNT_SQL = ("SELECT count(*) FROM billing_records WHERE tstzrange(start_time, end_time) && tstzrange(%(lo)s, %(hi)s)"
             " AND (%(shard_n)s = 1 OR (hashtext(org_id)::bigint & 2147483647) %% %(shard_n)s = %(shard_k)s)")

KIND_ORDER = ["daily_limit", "continuous_limit", "rate_mismatch", "charge_mismatch", "duplicate", "overlap",
              "billed_after_stop", "billed_while_idle", "usage_mismatch", "credit_mismatch"]

# Which check finding each anomaly kind would become (SPEC 2.2); None: no finding of its own.
FINDING_KIND = {
    "duplicate": "duplicate_charge", "overlap": "duplicate_charge",
    "billed_after_stop": "stuck_instance", "billed_while_idle": "stuck_instance",
    "continuous_limit": "throttle_continuous", "daily_limit": "throttle_daily",
    "rate_mismatch": "wrong_tier", "charge_mismatch": None, "usage_mismatch": None,
}


@dataclass
class Anomaly:
    kind: str
    instance_id: str | None
    org_id: str
    customer_id: str | None
    record_ids: list[int]
    overcharge_cents: int
    detail: str
    case_id: int | None = None  # credit_mismatch: the case whose books disagree with Polar

    @classmethod
    def from_json(cls, d: dict) -> "Anomaly":
        return cls(d["kind"], d["instance_id"], d["org_id"], d["customer_id"], list(d["record_ids"]),
                   int(d["overcharge_cents"]), d["detail"], d.get("case_id"))

    def as_json(self) -> dict:
        out = {"kind": self.kind, "instance_id": self.instance_id, "org_id": self.org_id,
               "customer_id": self.customer_id, "record_ids": self.record_ids,
               "overcharge_cents": self.overcharge_cents, "detail": self.detail}
        if self.case_id is not None:
            out["case_id"] = self.case_id
        return out


@dataclass
class Reconciliation:
    day: date
    anomalies: list[Anomaly]

    def totals(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for a in self.anomalies:
            t = out.setdefault(a.kind, {"count": 0, "overcharge_cents": 0})
            t["count"] += 1
            t["overcharge_cents"] += a.overcharge_cents
        return {k: out[k] for k in KIND_ORDER if k in out}

    def as_json(self) -> dict:
        return {"date": self.day.isoformat(), "anomalies": [a.as_json() for a in self.anomalies],
                "totals": self.totals()}

    def customer_kind_counts(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(customer, anomaly kind) -> (anomalies, overcharge cents), for the usage audit. The
        control-plane kinds only: credit_mismatch is about the bot's own books (and a sharded day
        adds it after its run is stored), and an anomaly without a customer has nobody to count for."""
        out: dict[tuple[str, str], tuple[int, int]] = {}
        for a in self.anomalies:
            if a.customer_id and a.kind in FINDING_KIND:
                n, cents = out.get((a.customer_id, a.kind), (0, 0))
                out[(a.customer_id, a.kind)] = (n + 1, cents + a.overcharge_cents)
        return out

    def customers_by_finding_kind(self) -> dict[str, set[str]]:
        seen: dict[str, set[str]] = {}
        for a in self.anomalies:
            fk = FINDING_KIND.get(a.kind)
            if fk and a.customer_id and a.overcharge_cents > 0:
                seen.setdefault(fk, set()).add(a.customer_id)
        return seen


def parse_day(text: str | None, now: datetime | None = None) -> date:
    """The --date argument, or yesterday (UTC). A day after today has nothing billed yet: its
    "0 anomalies" would read as an all clear, and its run would become the latest day (SPEC 5.2)."""
    today = (now or datetime.now(timezone.utc)).date()
    if text is None:
        return today - timedelta(days=1)
    day = validate_day(text)
    if day > today:
        raise InputError(f"date {day.isoformat()} is after today ({today.isoformat()} UTC): nothing to reconcile yet")
    return day


def parse_shard(text: str | None) -> tuple[int, int]:
    """--shard K/N: this process's part of the day, 0 <= K < N; none: the whole day (0/1)."""
    if text is None:
        return 0, 1
    k, sep, n = text.partition("/")
    if not (sep and k.isdigit() and n.isdigit() and 0 <= int(k) < int(n) <= 1024):
        raise InputError(f"malformed shard {text!r}: expected K/N with 0 <= K < N <= 1024, like 0/4")
    return int(k), int(n)


def sort_anomalies(anomalies: list[Anomaly]) -> list[Anomaly]:
    return sorted(anomalies, key=lambda a: (KIND_ORDER.index(a.kind), -a.overcharge_cents, a.org_id,
                                            a.instance_id or ""))


def _params(day: date, config: Config, shard: tuple[int, int] = (0, 1)) -> dict:
    lo = datetime.combine(day, time(0), timezone.utc)
    thr = config.throttle_defaults
    return {
        "lo": lo, "hi": lo + timedelta(days=1), "day": day,
        "tiers": list(config.rate_card), "rates": [config.rate_card[t] for t in config.rate_card],
        "def_cont": thr.continuous_limit, "def_daily": thr.daily_limit, "def_idle": thr.idle_timeout,
        "tolerance": config.usage_tolerance_hours, "shard_k": shard[0], "shard_n": shard[1],
    }


async def reconcile_day(conn, day: date, config: Config, shard: tuple[int, int] = (0, 1)) -> Reconciliation:
    """Run the reconciliation on an open connection (session in UTC), for the orgs of one shard.

    A big day is streamed in org-hash partitions of about PARTITION_ROWS rows, one statement each in
    the same snapshot: every kind is per instance or per org, so partitions never need each other,
    and each one's sorts and materialised rows stay within work_mem instead of spilling to disk."""
    cur = conn.cursor(row_factory=tuple_row)
    # a batch job over a whole day: a longer limit than the interactive reads get, and room for its
    # sorts (about 200 bytes a record) in memory rather than in temporary files
    await cur.execute(f"SET LOCAL statement_timeout = {RECONCILE_TIMEOUT_MS}")
    await cur.execute(f"SET LOCAL work_mem = '{RECONCILE_WORK_MEM}'")
    # the planner cannot see through the statement's CTEs and expects a handful of rows; a hash
    # aggregate sized for that spills the multirange states of a storm day to disk, a sort fits
    await cur.execute("SET LOCAL enable_hashagg = off")
    params = _params(day, config, shard)
    await cur.execute(COUNT_SQL, params, prepare=False)
    (rows,) = await cur.fetchone()
    parts = max(1, -(-rows // PARTITION_ROWS))
    k, n = shard
    anomalies = []
    for j in range(parts):
        # partition j of shard k of n: the orgs whose hash is k + n*j modulo n*parts (so k modulo n)
        await cur.execute(SQL, params | {"shard_k": k + n * j, "shard_n": n * parts}, prepare=False)
        for kind, instance_id, org_id, customer_id, record_ids, overcharge, detail in await cur.fetchall():
            # a record split into two own pieces is listed once
            anomalies.append(Anomaly(kind, instance_id, org_id, customer_id, sorted(set(record_ids or [])),
                                     to_cents(Decimal(overcharge or 0)) if overcharge and overcharge > 0 else 0,
                                     detail or ""))
    return Reconciliation(day, sort_anomalies(anomalies))


def render_text(rec: Reconciliation) -> str:
    lines = [f"Reconciliation for {rec.day.isoformat()}: {len(rec.anomalies)} anomalies"]
    for kind, t in rec.totals().items():
        lines.append(f"  {kind:<18} {t['count']:>5}  {fmt_money(t['overcharge_cents']):>12}")
    for a in rec.anomalies[:50]:
        who = a.instance_id or f"org {a.org_id}"
        lines.append(f"- {a.kind}: {who} ({a.customer_id}) {fmt_money(a.overcharge_cents)}: {a.detail}; "
                     f"records {', '.join(map(str, a.record_ids[:10]))}{' …' if len(a.record_ids) > 10 else ''}")
    if len(rec.anomalies) > 50:
        lines.append(f"…and {len(rec.anomalies) - 50} more (use --json)")
    return "\n".join(lines)


def write_json(rec: Reconciliation, out) -> None:
    """SPEC 5.2's JSON, one anomaly a line: written as it goes, since a storm day's tens of thousands
    of anomalies built into one indented string cost more memory than the whole reconciliation."""
    out.write(f'{{"date": {json.dumps(rec.day.isoformat())},\n "anomalies": [')
    for i, a in enumerate(rec.anomalies):
        out.write(("\n  " if i == 0 else ",\n  ") + json.dumps(a.as_json()))
    out.write(f'],\n "totals": {json.dumps(rec.totals())}}}\n')


async def add_books_check(rec: Reconciliation, db, polar, usage_event_name: str) -> None:
    """The bot's own books (issue 13): every credit it claims for the day matched by money in Polar,
    every refund naming a case matched by an issued case; mismatches as credit_mismatch."""
    from services.books import credit_mismatch_anomalies

    for a in await credit_mismatch_anomalies(db, polar, rec.day, usage_event_name=usage_event_name):
        rec.anomalies.append(Anomaly("credit_mismatch", a.get("instance_id"), a.get("org_id") or "",
                                     a.get("customer_id"), [], 0,
                                     f"case #{a['case_id']}: {a['detail']}" if a.get("case_id") else a["detail"],
                                     a.get("case_id")))

