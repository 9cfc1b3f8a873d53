-- Per customer and anomaly kind, what a whole-day reconciliation found (the monthly usage audit
-- shows each customer's anomalies). Written with the run (record_reconciliation: one process, or the
-- merge of a sharded day; never a shard's own row), in the same transaction. A month's counts read,
-- per day, the latest whole-day run only: reconciling a day again replaces that day's counts.
CREATE TABLE IF NOT EXISTS {schema}.reconcile_customer_kinds (
  run_id bigint NOT NULL REFERENCES {schema}.reconcile_runs (id),
  customer_id text NOT NULL,
  kind text NOT NULL,
  anomalies integer NOT NULL,
  overcharge_cents bigint NOT NULL,
  PRIMARY KEY (run_id, customer_id, kind)
);
CREATE INDEX IF NOT EXISTS reconcile_customer_kinds_customer_idx
  ON {schema}.reconcile_customer_kinds (customer_id, run_id);
-- true once the run's per-customer counts are stored (a run with no anomalies stores no rows; a run
-- an older bot stored has none): a day whose latest run is not marked is not known, not clean
ALTER TABLE {schema}.reconcile_runs ADD COLUMN IF NOT EXISTS customer_kinds_stored boolean NOT NULL DEFAULT false;
