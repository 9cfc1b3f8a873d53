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
-- records sharing no time with another record of their instance in the day (most of them): found
-- with one window pass; only the others need a self-join to find what lower ids billed first
ordered AS (
  SELECT d.*,
         (coalesce(max(d.end_time) OVER w_before <= d.start_time, true)
          AND coalesce(lead(d.start_time) OVER w >= d.end_time, true)) AS isolated
  FROM day_recs d
  WINDOW w AS (PARTITION BY d.instance_id ORDER BY d.start_time, d.id),
         w_before AS (w ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
),
-- the in-day parts of each record that no lower-id record of the instance billed first (step 1),
-- as plain pieces (s, e): disjoint within an instance, their union is the instance's billed time
own_pieces AS (
  SELECT id, instance_id, org_id, customer_id, total_charge, secs, lower(inday) AS s, upper(inday) AS e
  FROM ordered WHERE isolated
  UNION ALL
  SELECT x.id, x.instance_id, x.org_id, x.customer_id, x.total_charge, x.secs, lower(p), upper(p)
  FROM (SELECT a.id, a.instance_id, a.org_id, a.customer_id, a.total_charge, a.secs,
               tstzmultirange(a.inday)
                 - coalesce(range_agg(a.inday * b.span) FILTER (WHERE b.id IS NOT NULL), '{}'::tstzmultirange) AS m
        FROM ordered a
        LEFT JOIN day_recs b ON b.instance_id = a.instance_id AND b.id < a.id AND b.span && a.inday
        WHERE NOT a.isolated
        GROUP BY a.id, a.instance_id, a.org_id, a.customer_id, a.total_charge, a.secs, a.inday) x,
       unnest(x.m) AS p
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
  FROM ordered a
  JOIN day_recs b ON b.instance_id = a.instance_id AND b.id < a.id AND b.span && a.inday
                  AND NOT (b.start_time = a.start_time AND b.end_time = a.end_time)
  WHERE NOT a.isolated
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
-- continuous runs: the instance's billed time (own pieces in the day, plus records in the look-back
-- of limit + 60 s before it); a piece starting more than 60 s after everything before it ended
-- starts a new run
look AS (
  SELECT r.instance_id, r.org_id, NULL::bigint AS id, NULL::text AS customer_id, NULL::numeric AS total_charge,
         NULL::numeric AS secs, greatest(r.start_time, %(lo)s - l.cont - interval '60 seconds') AS s,
         least(r.end_time, %(lo)s) AS e
  FROM billing_records r JOIN lim l ON l.org_id = r.org_id
  WHERE tstzrange(r.start_time, r.end_time)
          && tstzrange(%(lo)s - (SELECT max(cont) FROM lim) - interval '60 seconds', %(lo)s)
        AND l.cont IS NOT NULL AND r.end_time > %(lo)s - l.cont - interval '60 seconds'
        AND r.start_time < %(lo)s AND r.end_time > r.start_time
        AND r.instance_id IN (SELECT instance_id FROM day_recs)
),
run_pieces AS (
  SELECT o.instance_id, o.org_id, o.id, o.customer_id, o.total_charge, o.secs, o.s, o.e
  FROM own_pieces o JOIN lim l ON l.org_id = o.org_id WHERE l.cont IS NOT NULL
  UNION ALL SELECT * FROM look
),
starts AS (
  SELECT *, sum(CASE WHEN before_end IS NULL OR s - before_end > interval '60 seconds' THEN 1 ELSE 0 END)
              OVER (PARTITION BY instance_id ORDER BY s, e ROWS UNBOUNDED PRECEDING) AS run
  FROM (SELECT *, max(e) OVER (PARTITION BY instance_id ORDER BY s, e
                               ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS before_end
        FROM run_pieces) y
),
runs AS (
  SELECT st.*, min(st.s) OVER (PARTITION BY st.instance_id, st.run) + l.cont AS cutoff,
         min(st.s) OVER (PARTITION BY st.instance_id, st.run) AS run_start, l.cont
  FROM starts st JOIN lim l ON l.org_id = st.org_id
),
k_cont AS (
  SELECT 'continuous_limit'::text, instance_id, org_id, min(customer_id), array_agg(DISTINCT id ORDER BY id),
         sum(total_charge * extract(epoch FROM e - greatest(s, cutoff)) / secs),
         format('run since %%s passed the %%s continuous limit', to_char(min(run_start), 'YYYY-MM-DD HH24:MI'), min(cont))
  FROM runs WHERE id IS NOT NULL AND e > cutoff
  GROUP BY instance_id, org_id
),
-- the org's daily limit: T is when the org's billed hours (each instance once per second) reach it
marks AS (
  SELECT org_id, t, sum(delta) AS delta FROM (
    SELECT org_id, s AS t, 1 AS delta FROM own_pieces UNION ALL SELECT org_id, e, -1 FROM own_pieces) z
  WHERE org_id IN (SELECT org_id FROM lim WHERE daily IS NOT NULL)
  GROUP BY org_id, t
),
slopes AS (
  SELECT org_id, t, sum(delta) OVER w AS running, lead(t) OVER w AS t_next
  FROM marks WINDOW w AS (PARTITION BY org_id ORDER BY t ROWS UNBOUNDED PRECEDING)
),
accrued AS (
  SELECT s.*, coalesce(sum(running * extract(epoch FROM t_next - t))
                         OVER (PARTITION BY org_id ORDER BY t ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before
  FROM slopes s
),
-- accrued time only grows, so exactly one segment per org crosses the limit: no sort needed
reached AS (
  SELECT a.org_id, l.daily,
         a.t + ((extract(epoch FROM l.daily) - a.before) / a.running) * interval '1 second' AS at
  FROM accrued a JOIN lim l ON l.org_id = a.org_id
  WHERE l.daily IS NOT NULL AND a.running > 0 AND a.t_next IS NOT NULL
        AND a.before <= extract(epoch FROM l.daily)
        AND a.before + a.running * extract(epoch FROM a.t_next - a.t) > extract(epoch FROM l.daily)
),
k_daily AS (
  SELECT 'daily_limit'::text, NULL::text, o.org_id, min(o.customer_id), array_agg(DISTINCT o.id ORDER BY o.id),
         sum(o.total_charge * extract(epoch FROM o.e - greatest(o.s, r.at)) / o.secs),
         format('org reached its %%s daily limit at %%s', min(r.daily), to_char(min(r.at), 'YYYY-MM-DD HH24:MI:SS'))
  FROM reached r JOIN own_pieces o ON o.org_id = r.org_id AND o.e > r.at
  GROUP BY o.org_id
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
