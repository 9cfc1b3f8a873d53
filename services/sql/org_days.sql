-- The org's billed time on some UTC days, for a check's daily limit (SPEC 2.2 step 4): per day, each
-- instance's records merged into disjoint spans (step 1 per instance), cut off where the org's time
-- passes the limit. Only the time before each day's bound is read: the time billed by any moment t
-- depends only on records starting before t, so a limit passed before the bound is passed at the
-- same moment whatever comes after it. A day that does not pass it before its bound returns nothing.
-- Many orgs at once, each with its own days and limit: one row of the parameters per (org, day).
-- Parameters: orgs (text[]), days (day starts, timestamptz[]), bounds (timestamptz[]), limits
-- (interval[]), one element per (org, day). Times are microseconds since the epoch. Session time
-- zone must be UTC.
WITH d AS (
  SELECT org, day, bound, (extract(epoch FROM day) * 1000000)::bigint AS lo,
         (extract(epoch FROM lim) * 1000000)::bigint AS lim_us
  FROM unnest(%(orgs)s::text[], %(days)s::timestamptz[], %(bounds)s::timestamptz[], %(limits)s::interval[])
       AS x(org, day, bound, lim)
),
-- the org's records of each day, found by the index on (org_id, start_time) for records starting
-- within a day before it, and by the GiST range index for the rare longer ones (those contain the
-- whole day before it): never the org's history before the day
recs AS (  -- per day, by its own index scans (OFFSET 0 keeps each a per-day subquery, not a filter)
  SELECT d.org, d.day, d.bound, d.lo, r.instance_id, r.start_time, r.end_time
  FROM d CROSS JOIN LATERAL (
    SELECT instance_id, start_time, end_time FROM billing_records
    WHERE org_id = d.org AND start_time > d.day - interval '1 day' AND start_time < d.bound AND end_time > d.day
    OFFSET 0) r
  UNION ALL
  SELECT d.org, d.day, d.bound, d.lo, r.instance_id, r.start_time, r.end_time
  FROM d CROSS JOIN LATERAL (
    SELECT instance_id, start_time, end_time FROM billing_records
    WHERE tstzrange(start_time, end_time) @> tstzrange(d.day - interval '1 day', d.day, '[]') AND org_id = d.org
    OFFSET 0) r
),
-- microseconds from the day's start (a double holds those exactly; the epoch's numeric is slower)
cut AS MATERIALIZED (
  SELECT org, lo, instance_id,
         lo + (date_part('epoch', greatest(start_time, day) - day) * 1000000)::bigint AS s,
         lo + (date_part('epoch', least(end_time, bound) - day) * 1000000)::bigint AS e
  FROM recs WHERE end_time > start_time
),
-- de-duplication only lowers billed time: a day whose raw sum stays within the limit cannot reach it
over AS (
  SELECT c.org, c.lo FROM cut c JOIN d USING (org, lo) GROUP BY c.org, c.lo, d.lim_us HAVING sum(c.e - c.s) > d.lim_us
),
-- each instance's spans on the day: a record starting after every earlier end opens a new span
marked AS (
  SELECT c.org, c.lo, c.instance_id, c.s, c.e,
         max(c.e) OVER (PARTITION BY c.org, c.lo, c.instance_id ORDER BY c.s, c.e
                        ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_e
  FROM cut c JOIN over USING (org, lo)
),
numbered AS (
  SELECT org, lo, instance_id, s, e, count(*) FILTER (WHERE prev_e IS NULL OR s > prev_e)
           OVER (PARTITION BY org, lo, instance_id ORDER BY s, e ROWS UNBOUNDED PRECEDING) AS span_no
  FROM marked
),
spans AS (
  SELECT org, lo, instance_id, min(s) AS s, max(e) AS e FROM numbered GROUP BY org, lo, instance_id, span_no
),
-- the org's time so far at each change: A(t) = t * open - sum(+-t) over the span starts and ends
events AS (
  SELECT org, lo, t, sum(dn) AS dn
  FROM (SELECT org, lo, s AS t, 1 AS dn FROM spans UNION ALL SELECT org, lo, e, -1 FROM spans) x
  GROUP BY org, lo, t
),
accrued AS (
  SELECT org, lo, t, sum(dn) OVER w AS open_after, sum(dn * t) OVER w AS st_after
  FROM events WINDOW w AS (PARTITION BY org, lo ORDER BY t ROWS UNBOUNDED PRECEDING)
),
-- the first change at which the time so far (before the change: A(t) = t * open - st of the
-- previous change) has reached the limit; with a limit of zero, the day start
reached AS (
  SELECT z.org, z.lo, min(z.t) AS t_next FROM (
    SELECT org, lo, t, lag(open_after) OVER w * t - lag(st_after) OVER w AS a
    FROM accrued WINDOW w AS (PARTITION BY org, lo ORDER BY t)) z
  JOIN d USING (org, lo)
  WHERE z.a >= d.lim_us
  GROUP BY z.org, z.lo
)
SELECT sp.org, sp.lo, sp.instance_id, sp.s, CASE WHEN d.lim_us <= 0 THEN sp.e ELSE least(sp.e, r.t_next) END
FROM spans sp JOIN reached r USING (org, lo) JOIN d USING (org, lo)
WHERE sp.s < r.t_next OR d.lim_us <= 0
