-- The org's billed time on some UTC days, for a check's daily limit (SPEC 2.2 step 4): per day, each
-- instance's records merged into disjoint spans (step 1 per instance), cut off where the org's time
-- passes the limit. Only the time before each day's bound is read: the time billed by any moment t
-- depends only on records starting before t, so a limit passed before the bound is passed at the
-- same moment whatever comes after it. A day that does not pass it before its bound returns nothing.
-- Parameters: org, days (day starts, timestamptz[]), bounds (timestamptz[], one per day), limit.
-- Times are microseconds since the epoch. Session time zone must be UTC.
WITH d AS (
  SELECT day, bound, (extract(epoch FROM day) * 1000000)::bigint AS lo
  FROM unnest(%(days)s::timestamptz[], %(bounds)s::timestamptz[]) AS x(day, bound)
),
-- the org's records of each day, found by the index on (org_id, start_time) for records starting
-- within a day before it, and by the GiST range index for the rare longer ones (those contain the
-- whole day before it): never the org's history before the day
recs AS (  -- per day, by its own index scans (OFFSET 0 keeps each a per-day subquery, not a filter)
  SELECT d.day, d.bound, d.lo, r.instance_id, r.start_time, r.end_time
  FROM d CROSS JOIN LATERAL (
    SELECT instance_id, start_time, end_time FROM billing_records
    WHERE org_id = %(org)s AND start_time > d.day - interval '1 day' AND start_time < d.bound AND end_time > d.day
    OFFSET 0) r
  UNION ALL
  SELECT d.day, d.bound, d.lo, r.instance_id, r.start_time, r.end_time
  FROM d CROSS JOIN LATERAL (
    SELECT instance_id, start_time, end_time FROM billing_records
    WHERE tstzrange(start_time, end_time) @> tstzrange(d.day - interval '1 day', d.day, '[]') AND org_id = %(org)s
    OFFSET 0) r
),
-- microseconds from the day's start (a double holds those exactly; the epoch's numeric is slower)
cut AS MATERIALIZED (
  SELECT lo, instance_id,
         lo + (date_part('epoch', greatest(start_time, day) - day) * 1000000)::bigint AS s,
         lo + (date_part('epoch', least(end_time, bound) - day) * 1000000)::bigint AS e
  FROM recs WHERE end_time > start_time
),
-- de-duplication only lowers billed time: a day whose raw sum stays within the limit cannot reach it
over AS (
  SELECT lo FROM cut GROUP BY lo HAVING sum(e - s) > (extract(epoch FROM %(limit)s::interval) * 1000000)::bigint
),
-- each instance's spans on the day: a record starting after every earlier end opens a new span
marked AS (
  SELECT c.lo, c.instance_id, c.s, c.e,
         max(c.e) OVER (PARTITION BY c.lo, c.instance_id ORDER BY c.s, c.e ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_e
  FROM cut c JOIN over USING (lo)
),
numbered AS (
  SELECT lo, instance_id, s, e, count(*) FILTER (WHERE prev_e IS NULL OR s > prev_e)
           OVER (PARTITION BY lo, instance_id ORDER BY s, e ROWS UNBOUNDED PRECEDING) AS span_no
  FROM marked
),
spans AS (
  SELECT lo, instance_id, min(s) AS s, max(e) AS e FROM numbered GROUP BY lo, instance_id, span_no
),
-- the org's time so far at each change: A(t) = t * open - sum(+-t) over the span starts and ends
events AS (
  SELECT lo, t, sum(dn) AS dn FROM (SELECT lo, s AS t, 1 AS dn FROM spans UNION ALL SELECT lo, e, -1 FROM spans) x
  GROUP BY lo, t
),
accrued AS (
  SELECT lo, t, sum(dn) OVER w AS open_after, sum(dn * t) OVER w AS st_after
  FROM events WINDOW w AS (PARTITION BY lo ORDER BY t ROWS UNBOUNDED PRECEDING)
),
-- the first change at which the time so far (before the change: A(t) = t * open - st of the
-- previous change) has reached the limit; with a limit of zero, the day start
reached AS (
  SELECT lo, min(t) AS t_next FROM (
    SELECT lo, t, lag(open_after) OVER w * t - lag(st_after) OVER w AS a
    FROM accrued WINDOW w AS (PARTITION BY lo ORDER BY t)) z
  WHERE a >= (extract(epoch FROM %(limit)s::interval) * 1000000)::bigint
  GROUP BY lo
)
SELECT sp.lo, sp.instance_id, sp.s, CASE WHEN (extract(epoch FROM %(limit)s::interval) * 1000000)::bigint <= 0 THEN sp.e
                                  ELSE least(sp.e, r.t_next) END
FROM spans sp JOIN reached r USING (lo)
WHERE sp.s < r.t_next OR (extract(epoch FROM %(limit)s::interval) * 1000000)::bigint <= 0
