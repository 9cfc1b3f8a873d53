-- billing-bot's own state. {schema} is replaced by the configured schema name (a checked identifier).
CREATE TABLE IF NOT EXISTS {schema}.cases (
  id bigserial PRIMARY KEY,
  instance_id text NOT NULL,
  org_id text NOT NULL,
  customer_id text NOT NULL,
  ticket_id text,
  periods text[] NOT NULL,
  state text NOT NULL DEFAULT 'pending'
    CHECK (state IN ('pending', 'approved', 'issuing', 'issued', 'rejected', 'failed', 'expired')),
  proposed_cents integer NOT NULL,          -- what the check found
  credit_cents integer NOT NULL,            -- the amount to issue (an approver may lower it)
  issued_cents integer,                     -- what Polar confirmed
  required_level integer NOT NULL,
  systematic boolean NOT NULL DEFAULT false,
  kinds text[] NOT NULL DEFAULT '{}',
  report jsonb NOT NULL,                    -- the check as SPEC 5 JSON, plus evidence
  approvers jsonb NOT NULL DEFAULT '{}',    -- level membership snapshotted at submission
  requested_by text NOT NULL,
  channel_id text,
  message_ts text,
  method text,
  decided_by text,
  decided_at timestamptz,
  reason text,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  issued_at timestamptz,
  next_remind_at timestamptz,
  reminders integer NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS cases_instance_idx ON {schema}.cases (instance_id, state);
CREATE INDEX IF NOT EXISTS cases_remind_idx ON {schema}.cases (next_remind_at) WHERE state = 'pending';

-- the pieces of billed time a case credits: later checks never credit them again
CREATE TABLE IF NOT EXISTS {schema}.case_pieces (
  case_id bigint NOT NULL REFERENCES {schema}.cases (id),
  kind text NOT NULL,
  record_id bigint NOT NULL,
  start_us bigint NOT NULL,
  end_us bigint NOT NULL,
  extra_events integer NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS case_pieces_case_idx ON {schema}.case_pieces (case_id);

-- every decision, refusal, ping and Polar call, with who and when
CREATE TABLE IF NOT EXISTS {schema}.case_events (
  id bigserial PRIMARY KEY,
  case_id bigint NOT NULL REFERENCES {schema}.cases (id),
  at timestamptz NOT NULL DEFAULT now(),
  actor text NOT NULL,
  action text NOT NULL,
  detail jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS case_events_case_idx ON {schema}.case_events (case_id, at);

-- the outbox of money movements: the intent is written before any call to Polar
CREATE TABLE IF NOT EXISTS {schema}.issuances (
  id bigserial PRIMARY KEY,
  case_id bigint NOT NULL REFERENCES {schema}.cases (id),
  method text NOT NULL CHECK (method IN ('refund', 'invoice_credit')),
  target text NOT NULL,                     -- the Polar order id (refund) or the event external_id prefix
  period text,
  amount_cents integer NOT NULL CHECK (amount_cents > 0),
  state text NOT NULL DEFAULT 'intent' CHECK (state IN ('intent', 'confirmed', 'failed')),
  polar_ref text,
  attempts integer NOT NULL DEFAULT 0,
  last_error text,
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  UNIQUE (case_id, target)
);

CREATE TABLE IF NOT EXISTS {schema}.reconcile_runs (
  id bigserial PRIMARY KEY,
  day date NOT NULL,
  ran_at timestamptz NOT NULL DEFAULT now(),
  totals jsonb NOT NULL
);
CREATE TABLE IF NOT EXISTS {schema}.reconcile_kind_customers (
  run_id bigint NOT NULL REFERENCES {schema}.reconcile_runs (id),
  period text NOT NULL,
  finding_kind text NOT NULL,
  customers integer NOT NULL,
  PRIMARY KEY (run_id, finding_kind)
);
