-- Cases over several instances (issue 16): a customer's or an org's check, and the per-customer
-- cases of a remediation batch. `instance_ids` lists every instance whose billed time the case
-- holds (one for an instance's case); `instance_id` and `org_id` stay for a one-instance case and
-- are NULL for a case over several.
ALTER TABLE {schema}.cases ALTER COLUMN instance_id DROP NOT NULL;
ALTER TABLE {schema}.cases ALTER COLUMN org_id DROP NOT NULL;
ALTER TABLE {schema}.cases ADD COLUMN IF NOT EXISTS instance_ids text[];
UPDATE {schema}.cases SET instance_ids = ARRAY[instance_id] WHERE instance_ids IS NULL;
ALTER TABLE {schema}.cases ALTER COLUMN instance_ids SET NOT NULL;
-- a writer that knows only instance_id (an older replica during a rolling deploy) still fills it
CREATE OR REPLACE FUNCTION {schema}.case_instances_default() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.instance_ids IS NULL AND NEW.instance_id IS NOT NULL THEN
    NEW.instance_ids := ARRAY[NEW.instance_id];
  END IF;
  RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS case_instances_default ON {schema}.cases;
CREATE TRIGGER case_instances_default BEFORE INSERT ON {schema}.cases
  FOR EACH ROW EXECUTE FUNCTION {schema}.case_instances_default();
ALTER TABLE {schema}.cases ADD CONSTRAINT cases_instances_check
  CHECK (cardinality(instance_ids) >= 1 AND (instance_id IS NULL OR instance_ids = ARRAY[instance_id]));
CREATE INDEX IF NOT EXISTS cases_instance_ids_idx ON {schema}.cases USING gin (instance_ids);

-- One remediation of a systematic defect (SPEC 5.3): a plan, bound by its fingerprint to one
-- approval, then one case per customer.
CREATE TABLE IF NOT EXISTS {schema}.remediation_batches (
  id bigserial PRIMARY KEY,
  kind text NOT NULL,
  period text NOT NULL,
  state text NOT NULL DEFAULT 'planned'
    CHECK (state IN ('planned', 'approved', 'rejected', 'superseded')),
  fingerprint text NOT NULL,
  total_cents integer NOT NULL,
  required_level integer NOT NULL,
  plan jsonb NOT NULL,                 -- SPEC 5.3's remediate --json, plus what the plan left out
  requested_by text NOT NULL,
  decided_by text,
  decided_levels integer[],            -- the approver's levels when approving: a resumed batch acts on them
  decided_at timestamptz,
  reason text,
  superseded_by bigint REFERENCES {schema}.remediation_batches (id),
  channel_id text,
  message_ts text,
  progress_ts text,                    -- the one progress message, updated as the batch goes
  progress_text text,                  -- what it last said: posted again only when it changes
  cases_opened boolean NOT NULL DEFAULT false,  -- every customer of the plan has its case
  finished boolean NOT NULL DEFAULT false,      -- nothing left to move: the progress message is final
  created_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS remediation_batches_open_idx ON {schema}.remediation_batches (id)
  WHERE state = 'approved' AND NOT finished;

ALTER TABLE {schema}.cases ADD COLUMN IF NOT EXISTS batch_id bigint REFERENCES {schema}.remediation_batches (id);
-- one case per customer and batch, whoever opens it (two replicas resuming the same batch)
CREATE UNIQUE INDEX IF NOT EXISTS cases_one_per_batch_customer_idx ON {schema}.cases (batch_id, customer_id)
  WHERE batch_id IS NOT NULL AND parent_case_id IS NULL;
