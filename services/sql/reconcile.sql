-- Daily reconciliation (SPEC 5.2): every anomaly of one UTC day in one set-based statement.
-- Read-only and temp-table free, so it runs on a read replica. Session time zone must be UTC.
-- Parameters: lo, hi (the day), day, tiers/rates (the rate card), def_cont/def_daily/def_idle
-- (throttle defaults, NULL = off), tolerance (usage hours), shard_k/shard_n (this process's part of
-- the day: the orgs whose hash is k modulo n; 0/1 is the whole day).
-- Amounts count only the part of each record inside the day. Each kind follows SPEC 2's
-- arithmetic for that kind alone; continuous and daily limits count each billed second once
-- (step 1's union), charged to the record that billed it first.
--
-- Shape, for speed (docs/architecture.md, "Reconciliation"): one index scan and ONE sort of the
-- records by instance; two window passes over that order find overlaps and continuous runs; the
-- result (recs) is materialised narrow, with times as microseconds from the day's start. Only the
-- records that share time with another record of their instance (odd, usually none) take the
-- slow path through multiranges. The per-record kinds read one small filtered set (few). The daily
-- limit sums start/end events per org and hour with a hash, and sweeps event by event only inside
-- the one hour per org that passes the limit.
WITH
card AS (
  SELECT * FROM unnest(%(tiers)s::text[], %(rates)s::numeric[]) AS c(tier, rate)
),
-- the day's records and, before the day, those a continuous run may have started from (the
-- longest continuous limit + 60 s back), sorted once by instance
scan AS (
  SELECT r.id, r.instance_id, r.org_id, r.customer_id, r.tier, r.rate_per_hour AS rate, r.hours_used AS hours,
         r.total_charge AS charge, r.start_time AS s0, r.end_time AS e0,
         CASE WHEN t.org_id IS NULL THEN %(def_cont)s::interval ELSE t.continuous_limit END AS cont,
         CASE WHEN t.org_id IS NULL THEN %(def_daily)s::interval ELSE t.daily_limit END AS daily,
         CASE WHEN t.org_id IS NULL THEN %(def_idle)s::interval ELSE t.idle_timeout END AS idle,
         max(r.end_time) OVER w AS prev_end, lead(r.start_time) OVER w AS next_start
  FROM billing_records r LEFT JOIN throttle_settings t ON t.org_id = r.org_id
  WHERE tstzrange(r.start_time, r.end_time)
          && tstzrange(%(lo)s - coalesce(greatest(%(def_cont)s::interval,
                                                   (SELECT max(continuous_limit) FROM throttle_settings))
                                         + interval '60 seconds', interval '0'), %(hi)s)
    AND r.end_time > r.start_time
    -- every kind is per instance or per org, so a day split by org needs nothing from other parts
    AND (%(shard_n)s = 1 OR (hashtext(r.org_id)::bigint & 2147483647) %% %(shard_n)s = %(shard_k)s)
  WINDOW w AS (PARTITION BY r.instance_id COLLATE "C" ORDER BY r.start_time, r.end_time, r.id
               ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
),
-- a run restarts after a gap of more than 60 s; its start is the latest such start so far
runs AS (
  SELECT x.*,
         max(CASE WHEN x.prev_end IS NULL OR x.s0 - x.prev_end > interval '60 seconds' THEN x.s0 END)
           OVER (PARTITION BY x.instance_id COLLATE "C" ORDER BY x.s0, x.e0, x.id ROWS UNBOUNDED PRECEDING) AS run_start
  FROM scan x
),
-- the day's records, narrow: times in microseconds from lo (s, e: the part in the day; len: the
-- whole record; cutoff: run start + continuous limit); isolated = shares no time in the day with
-- another record of its instance (the window saw every earlier end and the next start)
recs AS MATERIALIZED (
  SELECT y.id, y.instance_id, y.org_id, y.customer_id, y.charge, y.s0, y.e0, y.idle, y.cont, y.run_start,
         (date_part('epoch', greatest(y.s0, %(lo)s) - %(lo)s) * 1000000)::bigint AS s,
         (date_part('epoch', least(y.e0, %(hi)s) - %(lo)s) * 1000000)::bigint AS e,
         (date_part('epoch', y.e0 - y.s0) * 1000000)::bigint AS len,
         (date_part('epoch', y.run_start + y.cont - %(lo)s) * 1000000)::bigint AS cutoff,
         (date_part('epoch', y.daily) * 1000000)::bigint AS daily,
         coalesce(y.prev_end <= greatest(y.s0, %(lo)s), true) AND coalesce(y.next_start >= y.e0, true) AS isolated,
         CASE WHEN c.rate IS NULL OR y.rate <> c.rate
              THEN format('%%s billed at %%s/h, card %%s', y.tier, trim_scale(y.rate), coalesce(c.rate::text, 'has no such tier')) END AS rate_note,
         coalesce(c.rate, y.rate) AS card_rate,
         abs(y.hours * 3600000000 - (date_part('epoch', y.e0 - y.s0) * 1000000)::bigint) > 180000
           OR abs(y.charge - y.rate * y.hours) > 0.005 AS charge_bad
  FROM runs y LEFT JOIN card c ON c.tier = y.tier
  WHERE y.e0 > %(lo)s
),
-- the records that do share time: duplicates, overlaps, and the own pieces of step 1
odd AS MATERIALIZED (
  SELECT * FROM recs WHERE NOT isolated
),
-- one pass over the pairs of odd records of an instance that share time: per record, the time no
-- lower id billed (step 1's own pieces), and the time lower ids that are not exact copies cover
-- (the overlap kind); keyed by id alone, joined back to odd for the wide columns
odd_cover AS MATERIALIZED (
  SELECT o.id, o.instance_id, o.org_id, o.customer_id, o.charge, o.len, o.cutoff, o.run_start, o.cont, o.daily,
         c.own, c.covered, c.with_ids
  FROM odd o JOIN (
    SELECT a.id,
           tstzmultirange(tstzrange(greatest(a.s0, %(lo)s), least(a.e0, %(hi)s)))
             - coalesce(range_agg(tstzrange(b.s0, b.e0)) FILTER (WHERE b.id IS NOT NULL), '{}'::tstzmultirange) AS own,
           range_agg(tstzrange(greatest(a.s0, %(lo)s), least(a.e0, %(hi)s)) * tstzrange(b.s0, b.e0))
             FILTER (WHERE b.id IS NOT NULL AND NOT (b.s0 = a.s0 AND b.e0 = a.e0)) AS covered,
           array_agg(b.id) FILTER (WHERE b.id IS NOT NULL AND NOT (b.s0 = a.s0 AND b.e0 = a.e0)) AS with_ids
    FROM odd a
    LEFT JOIN odd b ON b.instance_id = a.instance_id AND b.id < a.id AND b.s0 < a.e0 AND b.e0 > a.s0
    GROUP BY a.id, a.s0, a.e0) c ON c.id = o.id
),
odd_pieces AS MATERIALIZED (
  SELECT x.id, x.instance_id, x.org_id, x.customer_id, x.charge, x.len, x.cutoff, x.run_start, x.cont, x.daily,
         (date_part('epoch', lower(p) - %(lo)s) * 1000000)::bigint AS s, (date_part('epoch', upper(p) - %(lo)s) * 1000000)::bigint AS e
  FROM odd_cover x, unnest(x.own) AS p
),
-- each billed second of an instance once: the isolated records' in-day parts and the odd ones' own
-- pieces (not materialised: each use is one pass over recs)
pieces AS NOT MATERIALIZED (
  SELECT id, instance_id, org_id, customer_id, charge, len, cutoff, run_start, cont, daily, s, e FROM recs WHERE isolated
  UNION ALL SELECT * FROM odd_pieces
),
-- instances that were stopped, or whose heartbeat ended, before the day's end
quiet AS (
  SELECT instance_id, status, stopped_at, last_heartbeat FROM instances
  WHERE (status <> 'running' AND stopped_at < %(hi)s) OR last_heartbeat < %(hi)s
),
-- the few records any per-record kind can concern, in one pass over recs
few AS MATERIALIZED (
  SELECT d.id, d.instance_id, d.org_id, d.customer_id, d.charge, d.len, d.s, d.e, d.e0, d.idle, d.cont, d.run_start,
         d.cutoff, d.isolated, d.rate_note, d.card_rate, d.charge_bad, q.status, q.stopped_at, q.last_heartbeat
  FROM recs d LEFT JOIN quiet q ON q.instance_id = d.instance_id
  WHERE d.rate_note IS NOT NULL OR d.charge_bad OR (d.isolated AND d.e > d.cutoff) OR q.instance_id IS NOT NULL
),
-- rate off the card for the record's own tier: overcharge = charge above hours x card rate
k_rate AS (
  SELECT 'rate_mismatch'::text AS kind, instance_id, org_id, min(customer_id) AS customer_id, array_agg(id) AS record_ids,
         sum(greatest(charge * (e - s) / len - card_rate * (e - s) / 3600000000, 0)) AS overcharge,
         string_agg(DISTINCT rate_note, '; ') AS detail
  FROM few WHERE rate_note IS NOT NULL
  GROUP BY instance_id, org_id
),
-- hours_used off the interval (by more than 0.00005 h), or total_charge off rate x hours by more than half a cent
k_charge AS (
  SELECT 'charge_mismatch'::text, instance_id, org_id, min(customer_id), array_agg(id), 0::numeric,
         format('%%s record(s): hours_used off the interval or total_charge off rate x hours', count(*))
  FROM few WHERE charge_bad
  GROUP BY instance_id, org_id
),
-- exact duplicates: every copy after the lowest id is wholly duplicate; one anomaly per instance
dup_groups AS (
  SELECT instance_id, org_id, min(customer_id) AS customer_id, array_agg(id) AS ids,
         sum(charge * (e - s) / len) - (array_agg(charge * (e - s) / len ORDER BY id))[1] AS extra,
         format('%%s copies of %%s–%%s', count(*), to_char(s0, 'YYYY-MM-DD HH24:MI'), to_char(e0, 'HH24:MI')) AS note
  FROM odd
  GROUP BY instance_id, org_id, s0, e0 HAVING count(*) > 1
),
k_dup AS (
  SELECT 'duplicate'::text, instance_id, org_id, min(customer_id),
         string_to_array(string_agg(array_to_string(ids, ','), ','), ',')::bigint[], sum(extra),
         string_agg(note, '; ' ORDER BY note)
  FROM dup_groups
  GROUP BY instance_id, org_id
),
-- partial overlaps: the part of a record covered by lower-id records that are not exact copies
overlap_parts AS (
  SELECT id, instance_id, org_id, customer_id, charge, len, covered, with_ids FROM odd_cover WHERE covered IS NOT NULL
),
-- every record an instance's overlaps name, gathered once per instance and joined below: a
-- correlated subquery here rescanned all of overlap_parts per instance, quadratic on the days
-- (metering retry storms) when overlaps are most of the rows
overlap_ids AS (
  SELECT instance_id, array_agg(DISTINCT x) AS ids
  FROM (SELECT instance_id, id AS x FROM overlap_parts
        UNION ALL SELECT instance_id, unnest(with_ids) FROM overlap_parts) z
  GROUP BY instance_id
),
k_overlap AS (
  SELECT 'overlap'::text, o.instance_id, o.org_id, min(o.customer_id), min(i.ids),
         sum(o.charge * (SELECT sum(date_part('epoch', upper(x) - lower(x)) * 1000000) FROM unnest(o.covered) x)::numeric / o.len),
         format('%%s record(s) partly cover time already billed', count(*))
  FROM overlap_parts o JOIN overlap_ids i ON i.instance_id = o.instance_id
  GROUP BY o.instance_id, o.org_id
),
-- billed after stopped_at of an instance that is not running, or after last_heartbeat + idle_timeout
stop_idle AS (
  SELECT d.instance_id, d.org_id, d.customer_id, d.id, d.charge, d.len, d.s, d.e, d.status, d.stopped_at,
         d.last_heartbeat, d.idle,
         CASE WHEN d.status <> 'running' AND d.stopped_at < %(hi)s AND d.e0 > d.stopped_at
              THEN (date_part('epoch', d.stopped_at - %(lo)s) * 1000000)::bigint END AS stop_from,
         CASE WHEN d.last_heartbeat + d.idle < %(hi)s AND d.e0 > d.last_heartbeat + d.idle
              THEN (date_part('epoch', d.last_heartbeat + d.idle - %(lo)s) * 1000000)::bigint END AS idle_from
  FROM few d
  WHERE (d.status <> 'running' AND d.stopped_at < %(hi)s AND d.e0 > d.stopped_at)
     OR (d.last_heartbeat + d.idle < %(hi)s AND d.e0 > d.last_heartbeat + d.idle)
),
k_stop AS (
  SELECT 'billed_after_stop'::text, instance_id, org_id, min(customer_id), array_agg(id),
         sum(charge * (e - greatest(s, stop_from)) / len),
         format('instance %%s since %%s', min(status), to_char(min(stopped_at), 'YYYY-MM-DD HH24:MI'))
  FROM stop_idle WHERE stop_from IS NOT NULL
  GROUP BY instance_id, org_id
),
k_idle AS (
  SELECT 'billed_while_idle'::text, instance_id, org_id, min(customer_id), array_agg(id),
         sum(charge * (e - greatest(s, idle_from)) / len),
         format('last heartbeat %%s, idle timeout %%s', to_char(min(last_heartbeat), 'YYYY-MM-DD HH24:MI'), min(idle))
  FROM stop_idle WHERE idle_from IS NOT NULL
  GROUP BY instance_id, org_id
),
-- instance_usage runtime against billed hours, per instance and day
billed_hours AS (
  SELECT instance_id, org_id, min(customer_id) AS customer_id, array_agg(id) AS ids,
         sum(e - s) / 3600000000.0 AS hours
  FROM recs GROUP BY instance_id, org_id
),
k_usage AS (
  SELECT 'usage_mismatch'::text, coalesce(b.instance_id, u.instance_id), coalesce(b.org_id, u.org_id),
         coalesce(b.customer_id, i.customer_id), coalesce(b.ids, '{}'), 0::numeric,
         format('billed %%s h, control plane ran %%s h', round(coalesce(b.hours, 0), 4), round(coalesce(u.hours_used, 0), 4))
  FROM billed_hours b
  FULL JOIN (SELECT * FROM instance_usage WHERE date = %(day)s
               AND (%(shard_n)s = 1 OR (hashtext(org_id)::bigint & 2147483647) %% %(shard_n)s = %(shard_k)s)) u
    ON u.instance_id = b.instance_id AND u.org_id = b.org_id
  LEFT JOIN instances i ON i.instance_id = coalesce(b.instance_id, u.instance_id)
  WHERE abs(coalesce(b.hours, 0) - coalesce(u.hours_used, 0)) > %(tolerance)s
),
-- continuous: the part of each piece after its run's start + the limit
k_cont AS (
  SELECT 'continuous_limit'::text, p.instance_id, p.org_id, min(p.customer_id), array_agg(p.id),
         sum(p.charge * (p.e - greatest(p.s, p.cutoff)) / p.len),
         format('run since %%s passed the %%s continuous limit', to_char(min(p.run_start), 'YYYY-MM-DD HH24:MI'), min(p.cont))
  FROM (SELECT instance_id, org_id, customer_id, id, charge, e, s, cutoff, len, run_start, cont FROM few WHERE isolated AND e > cutoff
        UNION ALL
        SELECT instance_id, org_id, customer_id, id, charge, e, s, cutoff, len, run_start, cont FROM odd_pieces WHERE e > cutoff) p
  GROUP BY p.instance_id, p.org_id
),
-- daily: the org has billed A(t) = t * D - S seconds by time t, where D is the number of open pieces and
-- S the sum of their starts minus the ends of the closed ones (+1/-1 events). A only grows, so
-- the limit is passed at one T. First per hour: the events summed per org and hour (a hash, not a
-- sort of every event); then the event by event sweep only inside the hour that passes the limit.
events AS (
  SELECT org_id, daily, s AS t, 1 AS d FROM pieces WHERE daily IS NOT NULL
  UNION ALL SELECT org_id, daily, e, -1 FROM pieces WHERE daily IS NOT NULL
),
-- per org and hour b: the events' net count and sum of d * t
hours AS (
  SELECT org_id, daily, t / 3600000000 AS b, sum(d) AS dn, sum(d * t) AS st
  FROM events GROUP BY org_id, daily, t / 3600000000
),
-- dc, sc: D and S after hour b's events; nb: the next hour with events (25: none). From the last
-- event of hour b to the start of hour nb, A grows straight: A(t) = t * dc - sc
hour_sums AS (
  SELECT org_id, daily, b, dn, st, sum(dn) OVER w AS dc, sum(st) OVER w AS sc,
         coalesce(lead(b) OVER w, 25) AS nb
  FROM hours WINDOW w AS (PARTITION BY org_id COLLATE "C" ORDER BY b ROWS UNBOUNDED PRECEDING)
),
-- the one stretch per org, from the start of hour b to the start of hour nb, with
-- A(start) <= limit < A(end); inside: the limit is passed within hour b's events, else after them
passing AS (
  SELECT org_id, daily, b, dc - dn AS d0, sc - st AS s0, dc, sc,
         (b + 1) * 3600000000 * dc - sc > daily AS inside
  FROM hour_sums
  WHERE b * 3600000000 * (dc - dn) - (sc - st) <= daily AND nb * 3600000000 * dc - sc > daily
),
-- inside hour b only: its events in time order after a start marker (d = 0) carrying D and S so far
sweep AS (
  SELECT org_id, daily, t, d0 + sum(d) OVER w AS dn, s0 + sum(d * t) OVER w AS st,
         coalesce(lead(t) OVER w, (b + 1) * 3600000000) AS t_next
  FROM (SELECT p.org_id, p.daily, p.b, p.d0, p.s0, p.b * 3600000000 AS t, 0 AS d FROM passing p WHERE p.inside
        UNION ALL
        SELECT p.org_id, p.daily, p.b, p.d0, p.s0, ev.t, ev.d
        FROM pieces x JOIN passing p ON p.org_id = x.org_id AND p.inside
                                     AND (x.s / 3600000000 = p.b OR x.e / 3600000000 = p.b),
             LATERAL (VALUES (x.s, 1), (x.e, -1)) AS ev(t, d)
        WHERE ev.t / 3600000000 = p.b) z
  WINDOW w AS (PARTITION BY org_id COLLATE "C" ORDER BY t, d ROWS UNBOUNDED PRECEDING)
),
-- T, the moment the org passes its limit: on the segment where A crosses it, T = (limit + S) / D
reached AS (
  SELECT org_id, daily, (daily + st) / dn AS at
  FROM sweep
  WHERE dn > 0 AND t * dn - st <= daily AND t_next * dn - st > daily
  UNION ALL
  SELECT org_id, daily, (daily + sc) / dc FROM passing WHERE NOT inside
),
k_daily AS (
  SELECT 'daily_limit'::text, NULL::text, o.org_id, min(o.customer_id), array_agg(o.id),
         sum(o.charge * (o.e - greatest(o.s, r.at)) / o.len),
         format('org reached its %%s h daily limit at %%s', trim_scale(min(r.daily) / 3600000000.0),
                to_char(%(lo)s + min(r.at) * interval '1 microsecond', 'YYYY-MM-DD HH24:MI:SS'))
  FROM reached r JOIN pieces o ON o.org_id = r.org_id AND o.e > r.at
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
