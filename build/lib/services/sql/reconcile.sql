-- Daily reconciliation (SPEC 5.2): every anomaly of one UTC day in one set-based statement.
-- Read-only and temp-table free, so it runs on a read replica. Session time zone must be UTC.
-- Parameters: lo, hi (the day), tiers/rates (the rate card), def_cont/def_daily/def_idle
-- (throttle defaults, NULL = off), tolerance (usage hours).
-- Amounts count only the part of each record inside the day. Each kind follows SPEC 2's
-- arithmetic for that kind alone; continuous and daily limits count each billed second once
-- (step 1's union), charged to the record that billed it first.
WITH
card AS (
  SELECT * FROM unnest(%(tiers)s::text[], %(rates)s::numeric[]) AS c(tier, rate)
),
day_recs AS (
  SELECT r.id, r.instance_id, r.org_id, r.customer_id, r.tier, r.rate_per_hour, r.hours_used, r.total_charge,
         r.start_time, r.end_time,
         tstzrange(r.start_time, r.end_time) AS span,
         tstzrange(greatest(r.start_time, %(lo)s), least(r.end_time, %(hi)s)) AS inday,
         extract(epoch FROM r.end_time - r.start_time) AS secs
  FROM billing_records r
  WHERE tstzrange(r.start_time, r.end_time) && tstzrange(%(lo)s, %(hi)s) AND r.end_time > r.start_time
),
lim AS (
  SELECT o.org_id,
         CASE WHEN t.org_id IS NULL THEN %(def_cont)s::interval ELSE t.continuous_limit END AS cont,
         CASE WHEN t.org_id IS NULL THEN %(def_daily)s::interval ELSE t.daily_limit END AS daily,
         CASE WHEN t.org_id IS NULL THEN %(def_idle)s::interval ELSE t.idle_timeout END AS idle
  FROM (SELECT DISTINCT org_id FROM day_recs) o LEFT JOIN throttle_settings t ON t.org_id = o.org_id
),
-- the in-day part of each record that no lower-id record of the instance billed first (step 1)
own AS (
  SELECT a.id,
         tstzmultirange(a.inday)
           - coalesce(range_agg(a.inday * b.span) FILTER (WHERE b.id IS NOT NULL), '{}'::tstzmultirange) AS own
  FROM day_recs a
  LEFT JOIN day_recs b ON b.instance_id = a.instance_id AND b.id < a.id AND b.span && a.inday
  GROUP BY a.id, a.inday
),

-- rate off the card for the record's own tier: overcharge = charge above hours x card rate
k_rate AS (
  SELECT 'rate_mismatch'::text AS kind, d.instance_id, d.org_id, min(d.customer_id) AS customer_id,
         array_agg(d.id ORDER BY d.id) AS record_ids,
         sum(greatest(d.total_charge * extract(epoch FROM upper(d.inday) - lower(d.inday)) / d.secs
                      - coalesce(c.rate, d.rate_per_hour) * extract(epoch FROM upper(d.inday) - lower(d.inday)) / 3600, 0))
           AS overcharge,
         string_agg(DISTINCT format('%%s billed at %%s/h, card %%s', d.tier, trim_scale(d.rate_per_hour),
                                    coalesce(c.rate::text, 'has no such tier')), '; ') AS detail
  FROM day_recs d LEFT JOIN card c ON c.tier = d.tier
  WHERE c.rate IS NULL OR d.rate_per_hour <> c.rate
  GROUP BY d.instance_id, d.org_id
),
-- hours_used off the interval, or total_charge off rate x hours by more than half a cent
k_charge AS (
  SELECT 'charge_mismatch'::text, d.instance_id, d.org_id, min(d.customer_id), array_agg(d.id ORDER BY d.id), 0::numeric,
         format('%%s record(s): hours_used off the interval or total_charge off rate x hours', count(*))
  FROM day_recs d
  WHERE abs(d.hours_used - d.secs / 3600) > 0.00005 OR abs(d.total_charge - d.rate_per_hour * d.hours_used) > 0.005
  GROUP BY d.instance_id, d.org_id
),
-- exact duplicates: every copy after the lowest id is wholly duplicate
dup_groups AS (
  SELECT d.*, min(d.id) OVER (PARTITION BY d.instance_id, d.start_time, d.end_time) AS first_id,
         count(*) OVER (PARTITION BY d.instance_id, d.start_time, d.end_time) AS copies
  FROM day_recs d
),
k_dup AS (
  SELECT 'duplicate'::text, instance_id, org_id, min(customer_id), array_agg(id ORDER BY id),
         sum(CASE WHEN id <> first_id THEN total_charge * extract(epoch FROM upper(inday) - lower(inday)) / secs ELSE 0 END),
         format('%%s copies of %%s–%%s', max(copies), to_char(start_time, 'YYYY-MM-DD HH24:MI'), to_char(end_time, 'HH24:MI'))
  FROM dup_groups WHERE copies > 1
  GROUP BY instance_id, org_id, start_time, end_time
),
-- partial overlaps: the part of a record covered by lower-id records that are not exact copies
overlap_parts AS (
  SELECT a.id, a.instance_id, a.org_id, a.customer_id, a.total_charge, a.secs,
         range_agg(a.inday * b.span) AS covered, array_agg(DISTINCT b.id) AS with_ids
  FROM day_recs a
  JOIN day_recs b ON b.instance_id = a.instance_id AND b.id < a.id AND b.span && a.inday
                  AND NOT (b.start_time = a.start_time AND b.end_time = a.end_time)
  GROUP BY a.id, a.instance_id, a.org_id, a.customer_id, a.total_charge, a.secs
),
overlap_ids AS (
  SELECT instance_id, array_agg(DISTINCT x ORDER BY x) AS ids
  FROM (SELECT instance_id, id AS x FROM overlap_parts
        UNION SELECT instance_id, unnest(with_ids) FROM overlap_parts) z
  GROUP BY instance_id
),
k_overlap AS (
  SELECT 'overlap'::text, o.instance_id, o.org_id, min(o.customer_id), min(i.ids),
         sum(o.total_charge * (SELECT sum(extract(epoch FROM upper(x) - lower(x))) FROM unnest(o.covered) x) / o.secs),
         format('%%s record(s) partly cover time already billed', count(*))
  FROM overlap_parts o JOIN overlap_ids i ON i.instance_id = o.instance_id
  GROUP BY o.instance_id, o.org_id
),
-- billed after stopped_at of an instance that is not running
k_stop AS (
  SELECT 'billed_after_stop'::text, d.instance_id, d.org_id, min(d.customer_id), array_agg(d.id ORDER BY d.id),
         sum(d.total_charge * extract(epoch FROM least(d.end_time, %(hi)s) - greatest(d.start_time, %(lo)s, i.stopped_at)) / d.secs),
         format('instance %%s since %%s', min(i.status), to_char(min(i.stopped_at), 'YYYY-MM-DD HH24:MI'))
  FROM day_recs d JOIN instances i ON i.instance_id = d.instance_id
  WHERE i.status <> 'running' AND i.stopped_at IS NOT NULL AND d.end_time > i.stopped_at AND i.stopped_at < %(hi)s
  GROUP BY d.instance_id, d.org_id
),
-- billed after last_heartbeat + idle_timeout
k_idle AS (
  SELECT 'billed_while_idle'::text, d.instance_id, d.org_id, min(d.customer_id), array_agg(d.id ORDER BY d.id),
         sum(d.total_charge * extract(epoch FROM least(d.end_time, %(hi)s)
                                     - greatest(d.start_time, %(lo)s, i.last_heartbeat + l.idle)) / d.secs),
         format('last heartbeat %%s, idle timeout %%s', to_char(min(i.last_heartbeat), 'YYYY-MM-DD HH24:MI'), min(l.idle))
  FROM day_recs d JOIN instances i ON i.instance_id = d.instance_id JOIN lim l ON l.org_id = d.org_id
  WHERE l.idle IS NOT NULL AND i.last_heartbeat IS NOT NULL AND d.end_time > i.last_heartbeat + l.idle
        AND i.last_heartbeat + l.idle < %(hi)s
  GROUP BY d.instance_id, d.org_id
),
-- instance_usage runtime against billed hours, per instance and day
billed_hours AS (
  SELECT instance_id, org_id, min(customer_id) AS customer_id, array_agg(id ORDER BY id) AS ids,
         sum(extract(epoch FROM upper(inday) - lower(inday))) / 3600 AS hours
  FROM day_recs GROUP BY instance_id, org_id
),
k_usage AS (
  SELECT 'usage_mismatch'::text, coalesce(b.instance_id, u.instance_id), coalesce(b.org_id, u.org_id),
         coalesce(b.customer_id, i.customer_id), coalesce(b.ids, '{}'), 0::numeric,
         format('billed %%s h, control plane ran %%s h', round(coalesce(b.hours, 0), 4), round(coalesce(u.hours_used, 0), 4))
  FROM billed_hours b
  FULL JOIN (SELECT * FROM instance_usage WHERE date = %(day)s) u
    ON u.instance_id = b.instance_id AND u.org_id = b.org_id
  LEFT JOIN instances i ON i.instance_id = coalesce(b.instance_id, u.instance_id)
  WHERE abs(coalesce(b.hours, 0) - coalesce(u.hours_used, 0)) > %(tolerance)s
),
-- continuous runs: each instance's billed time (once per second) since limit + 60 s before the day
look AS (
  SELECT r.id, r.instance_id, r.org_id, l.cont,
         tstzrange(greatest(r.start_time, %(lo)s - l.cont - interval '60 seconds'), least(r.end_time, %(hi)s)) AS span
  FROM billing_records r JOIN lim l ON l.org_id = r.org_id
  WHERE tstzrange(r.start_time, r.end_time)
          && tstzrange(%(lo)s - (SELECT max(cont) FROM lim) - interval '60 seconds', %(hi)s)
        AND l.cont IS NOT NULL AND r.end_time > %(lo)s - l.cont - interval '60 seconds'
        AND r.end_time > r.start_time
        AND r.instance_id IN (SELECT instance_id FROM day_recs)
),
spans AS (
  SELECT instance_id, org_id, cont, lower(s) AS s, upper(s) AS e
  FROM (SELECT instance_id, org_id, cont, range_agg(span) AS m FROM look GROUP BY instance_id, org_id, cont) x,
       unnest(m) AS s
),
islands AS (
  SELECT *, sum(CASE WHEN s - prev_e > interval '60 seconds' OR prev_e IS NULL THEN 1 ELSE 0 END)
              OVER (PARTITION BY instance_id ORDER BY s) AS island
  FROM (SELECT *, lag(e) OVER (PARTITION BY instance_id ORDER BY s) AS prev_e FROM spans) y
),
runs AS (
  SELECT instance_id, org_id, cont, island, min(s) AS run_start, range_agg(tstzrange(s, e)) AS billed
  FROM islands GROUP BY instance_id, org_id, cont, island
),
cont_excess AS (
  SELECT instance_id, org_id, cont, min(run_start) AS run_start,
         range_agg(r.billed * tstzmultirange(tstzrange(greatest(run_start + cont, %(lo)s), %(hi)s))) AS excess
  FROM runs r WHERE run_start + cont < %(hi)s
  GROUP BY instance_id, org_id, cont
),
k_cont AS (
  SELECT 'continuous_limit'::text, d.instance_id, d.org_id, min(d.customer_id), array_agg(d.id ORDER BY d.id),
         sum(d.total_charge * (SELECT coalesce(sum(extract(epoch FROM upper(x) - lower(x))), 0)
                               FROM unnest(o.own * c.excess) x) / d.secs),
         format('run since %%s passed the %%s continuous limit', to_char(min(c.run_start), 'YYYY-MM-DD HH24:MI'), min(c.cont))
  FROM cont_excess c JOIN day_recs d ON d.instance_id = c.instance_id JOIN own o ON o.id = d.id
  WHERE NOT isempty(c.excess) AND o.own && c.excess
  GROUP BY d.instance_id, d.org_id
),
-- the org's daily limit: T is when the org's billed hours (each instance once per second) reach it
inst_day AS (
  SELECT d.org_id, lower(s) AS s, upper(s) AS e
  FROM (SELECT org_id, instance_id, range_agg(inday) AS m FROM day_recs GROUP BY org_id, instance_id) d, unnest(m) AS s
),
marks AS (
  SELECT org_id, t, sum(delta) AS delta FROM (
    SELECT org_id, s AS t, 1 AS delta FROM inst_day UNION ALL SELECT org_id, e, -1 FROM inst_day) z
  GROUP BY org_id, t
),
slopes AS (
  SELECT org_id, t, sum(delta) OVER w AS running, lead(t) OVER w AS t_next
  FROM marks WINDOW w AS (PARTITION BY org_id ORDER BY t)
),
accrued AS (
  SELECT s.*, coalesce(sum(running * extract(epoch FROM t_next - t))
                         OVER (PARTITION BY org_id ORDER BY t ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before
  FROM slopes s
),
reached AS (
  SELECT DISTINCT ON (a.org_id) a.org_id, l.daily,
         a.t + ((extract(epoch FROM l.daily) - a.before) / a.running) * interval '1 second' AS at
  FROM accrued a JOIN lim l ON l.org_id = a.org_id
  WHERE l.daily IS NOT NULL AND a.running > 0 AND t_next IS NOT NULL
        AND a.before + a.running * extract(epoch FROM a.t_next - a.t) > extract(epoch FROM l.daily)
  ORDER BY a.org_id, a.t
),
k_daily AS (
  SELECT 'daily_limit'::text, NULL::text, d.org_id, min(d.customer_id), array_agg(d.id ORDER BY d.id),
         sum(d.total_charge * (SELECT coalesce(sum(extract(epoch FROM upper(x) - lower(x))), 0)
                               FROM unnest(o.own * tstzmultirange(tstzrange(r.at, %(hi)s))) x) / d.secs),
         format('org reached its %%s daily limit at %%s', min(r.daily), to_char(min(r.at), 'YYYY-MM-DD HH24:MI:SS'))
  FROM reached r JOIN day_recs d ON d.org_id = r.org_id JOIN own o ON o.id = d.id
  WHERE d.end_time > r.at AND o.own && tstzmultirange(tstzrange(r.at, %(hi)s))
  GROUP BY d.org_id
)
SELECT kind, instance_id, org_id, customer_id, record_ids, overcharge, detail
FROM (SELECT * FROM k_daily
UNION ALL SELECT * FROM k_cont
UNION ALL SELECT * FROM k_rate
UNION ALL SELECT * FROM k_charge
UNION ALL SELECT * FROM k_dup
UNION ALL SELECT * FROM k_overlap
UNION ALL SELECT * FROM k_stop
UNION ALL SELECT * FROM k_idle
UNION ALL SELECT * FROM k_usage
) AS all_kinds (kind, instance_id, org_id, customer_id, record_ids, overcharge, detail)
