-- A day reconciled in shards (reconcile --shard K/N): each shard's row carries its anomalies; the
-- shard that completes the set writes the merged run (shard NULL), which the systematic rule reads.
-- The unique indexes make both steps exactly-once across concurrent shards: a retried shard replaces
-- its own row, and only one process can insert the merged run or claim its post.
ALTER TABLE {schema}.reconcile_runs ADD COLUMN IF NOT EXISTS run_key text;
ALTER TABLE {schema}.reconcile_runs ADD COLUMN IF NOT EXISTS shard integer;  -- NULL: the whole day
ALTER TABLE {schema}.reconcile_runs ADD COLUMN IF NOT EXISTS shards integer NOT NULL DEFAULT 1;
ALTER TABLE {schema}.reconcile_runs ADD COLUMN IF NOT EXISTS anomalies jsonb;
ALTER TABLE {schema}.reconcile_runs ADD COLUMN IF NOT EXISTS posted_at timestamptz;
CREATE UNIQUE INDEX IF NOT EXISTS reconcile_runs_shard_uq ON {schema}.reconcile_runs (run_key, shard)
  WHERE shard IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS reconcile_runs_merged_uq ON {schema}.reconcile_runs (run_key)
  WHERE shard IS NULL AND run_key IS NOT NULL;
-- the systematic rule reads the whole-day run of the latest reconciled day
CREATE INDEX IF NOT EXISTS reconcile_runs_day_idx ON {schema}.reconcile_runs (day, id) WHERE shard IS NULL;
