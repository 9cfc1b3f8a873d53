ALTER TABLE {schema}.cases ADD COLUMN IF NOT EXISTS polar_reference text;
ALTER TABLE {schema}.cases ADD COLUMN IF NOT EXISTS remainder_cents integer NOT NULL DEFAULT 0;
ALTER TABLE {schema}.cases ADD COLUMN IF NOT EXISTS notified boolean NOT NULL DEFAULT false;
