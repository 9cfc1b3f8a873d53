-- The case lifecycle of handlers/cases.py, held by the database too (issues 11 and 12).
ALTER TABLE {schema}.cases ADD COLUMN IF NOT EXISTS exposure_cents integer NOT NULL DEFAULT 0;
ALTER TABLE {schema}.cases ADD COLUMN IF NOT EXISTS fingerprint text;
ALTER TABLE {schema}.cases ADD COLUMN IF NOT EXISTS response_url text;
ALTER TABLE {schema}.cases ADD COLUMN IF NOT EXISTS failures integer NOT NULL DEFAULT 0;
ALTER TABLE {schema}.cases ADD COLUMN IF NOT EXISTS parent_case_id bigint REFERENCES {schema}.cases (id);
ALTER TABLE {schema}.cases ADD COLUMN IF NOT EXISTS swept_at timestamptz;
CREATE INDEX IF NOT EXISTS cases_customer_idx ON {schema}.cases (customer_id, state);
CREATE INDEX IF NOT EXISTS cases_unfinished_idx ON {schema}.cases (updated_at)
  WHERE state IN ('approved', 'issuing') OR (state = 'issued' AND NOT notified);
CREATE INDEX IF NOT EXISTS case_pieces_record_idx ON {schema}.case_pieces (record_id);

-- a refund Polar accepted but has not settled yet is 'pending' (SPEC 4)
ALTER TABLE {schema}.issuances DROP CONSTRAINT IF EXISTS issuances_state_check;
ALTER TABLE {schema}.issuances ADD CONSTRAINT issuances_state_check
  CHECK (state IN ('intent', 'pending', 'confirmed', 'failed'));

-- The legal (from, to) state pairs, rewritten from handlers.cases.TRANSITIONS at every start, and
-- a trigger that refuses any other change of state, whoever writes the row.
CREATE TABLE IF NOT EXISTS {schema}.case_transitions (
  from_state text NOT NULL,
  to_state text NOT NULL,
  PRIMARY KEY (from_state, to_state)
);
CREATE OR REPLACE FUNCTION {schema}.case_state_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.state IS DISTINCT FROM OLD.state AND NOT EXISTS (
      SELECT 1 FROM {schema}.case_transitions t WHERE t.from_state = OLD.state AND t.to_state = NEW.state) THEN
    RAISE EXCEPTION 'illegal case transition % -> % (case %)', OLD.state, NEW.state, OLD.id
      USING ERRCODE = 'check_violation';
  END IF;
  RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS case_state_guard ON {schema}.cases;
CREATE TRIGGER case_state_guard BEFORE UPDATE OF state ON {schema}.cases
  FOR EACH ROW EXECUTE FUNCTION {schema}.case_state_guard();

-- what Polar last said of a refund, and whether its failure was already told (SPEC 4)
ALTER TABLE {schema}.issuances ADD COLUMN IF NOT EXISTS refund_status text;
ALTER TABLE {schema}.issuances ADD COLUMN IF NOT EXISTS failure_told boolean NOT NULL DEFAULT false;
-- one remainder case per case at most
CREATE UNIQUE INDEX IF NOT EXISTS cases_one_remainder_idx ON {schema}.cases (parent_case_id)
  WHERE parent_case_id IS NOT NULL;
-- refunds an intent tried before it was reopened: news of them is history, never the current refund
ALTER TABLE {schema}.issuances ADD COLUMN IF NOT EXISTS old_refs text[] NOT NULL DEFAULT '{}';
