-- Customers support watches by hand (the runbook's "manual monitoring list"): the morning
-- reconciliation lists their anomalies first, even below the usual thresholds.
CREATE TABLE IF NOT EXISTS {schema}.watchlist (
  customer_id text PRIMARY KEY,
  reason text,
  added_by text,
  added_at timestamptz DEFAULT now()
);
