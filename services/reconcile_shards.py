"""A day reconciled in shards (`reconcile --shard K/N`), merged through the run's reconcile_runs rows.

Each shard is a one-shot process over the orgs whose hash falls in its part of the day. It stores
its anomalies in its own row (a retry replaces it). Whichever shard finds all N rows present merges
them and stores the whole-day run; the unique index on the run key lets exactly one do so, and the
morning message is claimed by a conditional UPDATE, so it is posted once however the shards finish.
"""
from __future__ import annotations

from services.reconcile import Anomaly, Reconciliation, sort_anomalies
from services.store import Store


async def save_shard(db, run_key: str, shard: tuple[int, int], rec: Reconciliation) -> None:
    store = Store(db)
    await store.migrate()
    await store.save_shard_row(run_key, shard, rec.day, rec.totals(), [a.as_json() for a in rec.anomalies])


async def merge_if_complete(db, run_key: str, day, shards: int) -> Reconciliation | None:
    """The whole day, once every shard's row is in; None while some are missing.

    Each shard reads after its own row is committed, so the last to commit sees all N: at least one
    shard merges. Storing the merge is left to the unique index, so it is stored at most once."""
    rows = await Store(db).shard_rows(run_key, shards, day)
    if len(rows) < shards:
        return None
    merged = Reconciliation(day, sort_anomalies([Anomaly.from_json(a) for r in rows for a in r["anomalies"]]))
    await Store(db).record_reconciliation(merged, run_key=run_key, shards=shards)
    return merged


async def claim_post(db, run_key: str) -> bool:
    """True for exactly one process: the one whose UPDATE marked the merged run as being posted."""
    return await Store(db).claim_post(run_key)


async def release_post(db, run_key: str) -> None:
    """The post failed: let a retried shard claim it again."""
    await Store(db).release_post(run_key)
