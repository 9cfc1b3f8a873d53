-- Polar webhook deliveries already taken (SPEC 4: a repeated delivery changes nothing). The
-- webhook-id is Standard Webhooks' delivery id: Polar's retries of one event carry the same one.
CREATE TABLE IF NOT EXISTS {schema}.polar_webhook_deliveries (
  webhook_id text PRIMARY KEY,
  event_type text,
  received_at timestamptz DEFAULT now()
);
