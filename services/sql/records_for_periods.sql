-- The records a check of some billing periods needs (docs/decisions.md, "A check reads what its
-- periods can be changed by"): the records of the periods; every record overlapping the time from
-- the start of the run the earliest of them belongs to, to the end of the latest. That time holds
-- the lower-id records overlapping theirs (step 1) and the whole continuous run reaching into them
-- (step 3): a run is only broken by a gap of more than the run gap (60 s) in the billed time, so
-- records that end before such a gap cannot change a later piece. Stop windows come from the
-- instance row, Kubernetes and the control-plane log, not from here.
-- Parameters: instance, periods (text[]), gap (interval). Times of the result in epoch microseconds.
WITH h AS MATERIALIZED (  -- the instance's history, narrow: one pass over its index
  SELECT id, start_time AS s, end_time AS e, billing_period = ANY(%(periods)s) AS asked
  FROM billing_records WHERE instance_id = %(instance)s
),
asked AS (
  SELECT min(s) AS lo, max(e) AS hi FROM h WHERE asked
),
-- where the run holding the earliest asked record begins: the latest record start before it that
-- follows a gap of more than the run gap in the billed time (none: the first record). Looked for
-- first among the records of the two days before it (a small sort); a start there counts only if
-- the gap before it lies inside those days. Only a run longer than that sorts the whole history.
near AS (
  SELECT s, max(e) OVER (ORDER BY s, e ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_e
  FROM h, asked WHERE h.s <= asked.lo AND h.e > asked.lo - interval '2 days'
),
run_start AS (
  SELECT coalesce(
    (SELECT max(s) FROM near, asked
     WHERE (prev_e IS NULL OR s - prev_e > %(gap)s::interval) AND s >= asked.lo - interval '2 days' + %(gap)s::interval),
    (SELECT coalesce(max(s) FILTER (WHERE prev_e IS NULL OR s - prev_e > %(gap)s::interval), min(s))
     FROM (SELECT s, max(e) OVER (ORDER BY s, e ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_e
           FROM h, asked WHERE h.s <= asked.lo) x)) AS lo
)
SELECT {columns}
FROM billing_records r
WHERE r.id IN (SELECT h.id FROM h, asked, run_start
               WHERE h.asked OR (h.s < asked.hi AND h.e > least(run_start.lo, asked.lo)))
ORDER BY r.id
