-- Runs: reads for the API, and idempotency records.

-- name: owned_run
-- GET /v1/runs/{id} for a lone reader (dpp.runs.reads): the run, only where it
-- is this tenant's (another tenant's run is no row, like an unknown id: SPEC §3).
-- A primary-key lookup, cheaper than owned_runs' pairs for a single read.
SELECT r.* FROM runs r WHERE r.id = $1 AND r.tenant_id = $2;

-- name: owned_runs
-- GET /v1/runs/{id} for every reader of a burst at once (dpp.runs.reads): the run
-- of each (tenant_id, id) pair of the two arrays, only where the run is that
-- tenant's — another tenant's run is no row, like an unknown id (SPEC §3). A pair
-- asked twice is one row. A function (migration 0009): runs_pkey per pair,
-- whatever the statistics said when the plan was made.
SELECT * FROM dpp_owned_runs($1::text[], $2::text[]);

-- name: list_runs
-- Newest first; the cursor is the (created_at, id) of the last row seen.
SELECT r.*
FROM runs r
WHERE r.tenant_id = $1
  AND ($2::text[] IS NULL OR r.status = ANY($2::text[]))
  AND ($3::timestamptz IS NULL OR (r.created_at, r.id) < ($3::timestamptz, $4::text))
  AND (r.retention_until IS NULL OR r.retention_until > now())
ORDER BY r.created_at DESC, r.id DESC
LIMIT $5;

-- name: usage_by_day
-- A run counts on the UTC date it was created; money columns count settled amounts.
SELECT (r.created_at AT TIME ZONE 'UTC')::date AS day,
       r.pack_type,
       count(*) AS runs,
       count(*) FILTER (WHERE r.status = 'COMPLETED') AS completed,
       count(*) FILTER (WHERE r.status = 'FAILED') AS failed,
       count(*) FILTER (WHERE r.status = 'EXPIRED') AS expired,
       count(*) FILTER (WHERE r.status = 'CANCELED') AS canceled,
       COALESCE(sum(r.charged_usd_micros), 0)::bigint AS charged_usd_micros,
       COALESCE(sum(r.refunded_usd_micros), 0)::bigint AS refunded_usd_micros
FROM runs r
WHERE r.tenant_id = $1
  AND r.created_at >= ($2::date)::timestamp AT TIME ZONE 'UTC'
  AND r.created_at < (($3::date) + 1)::timestamp AT TIME ZONE 'UTC'
GROUP BY 1, 2
ORDER BY 1, 2;

-- name: idempotency_insert
-- Committed without waiting for the WAL flush (asynchronous commit, this
-- statement's transaction only): the in-flight record is visible at once, and
-- losing it in a Postgres crash is a release -- the reservation's own
-- (synchronous) transaction locks the key row and admits the draft only if
-- the record is there and owned, and its commit flushes the WAL up to and past
-- this insert. One WAL flush less per submit (~1-3 ms here, the c=1 latency).
WITH relaxed AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true))
INSERT INTO idempotency_keys (tenant_id, method, path, key, request_sha256, state, locked_until,
                              owner_token)
SELECT $1, $2, $3, $4, $5, 'in_flight', now() + make_interval(secs => $6), $7
FROM relaxed
ON CONFLICT DO NOTHING
RETURNING key;

-- name: idempotency_get
SELECT request_sha256, state, response_status, response_headers, response_body,
       locked_until < now() AS lock_expired
FROM idempotency_keys
WHERE tenant_id = $1 AND method = $2 AND path = $3 AND key = $4;

-- name: idempotency_take_over
-- A holder that died (lock expired) leaves the key to the next request, which
-- becomes its owner: the old holder can no longer complete it (nor reserve with it).
UPDATE idempotency_keys
SET locked_until = now() + make_interval(secs => $5), created_at = now(), owner_token = $6
WHERE tenant_id = $1 AND method = $2 AND path = $3 AND key = $4
  AND state = 'in_flight' AND locked_until < now()
RETURNING key;

-- name: idempotency_complete
-- Only the request that owns the key stores its outcome.
UPDATE idempotency_keys
SET state = 'done', response_status = $5, response_headers = $6, response_body = $7
WHERE tenant_id = $1 AND method = $2 AND path = $3 AND key = $4 AND state = 'in_flight'
  AND owner_token = $8
RETURNING key;

-- name: idempotency_release
-- Only the owner's record, only while in flight: a completed record (the
-- reservation committed after all) or another request's stays.
DELETE FROM idempotency_keys
WHERE tenant_id = $1 AND method = $2 AND path = $3 AND key = $4 AND state = 'in_flight'
  AND owner_token = $5
RETURNING key;

-- name: idempotency_sweep
DELETE FROM idempotency_keys
WHERE ctid IN (
    SELECT ctid FROM idempotency_keys
    WHERE created_at < now() - make_interval(hours => $1)
      AND (state = 'done' OR locked_until < now())
    LIMIT $2
);

-- name: operator_list_runs
-- The operator console: any tenant's runs (or one tenant's, $1), newest first;
-- a page after the (created_at, id) of the last row seen ($4, $5), if given.
SELECT r.id, r.tenant_id, r.pack_type, r.status, r.reserved_usd_micros,
       r.charged_usd_micros, r.refunded_usd_micros, r.created_at, r.started_at,
       r.claimed_at, r.finished_at, r.attempts, r.error, r.result_key, r.result_sha256,
       r.result_bytes
FROM runs r
WHERE ($1::text IS NULL OR r.tenant_id = $1)
  AND ($2::text[] IS NULL OR r.status = ANY($2::text[]))
  AND ($4::timestamptz IS NULL OR (r.created_at, r.id) < ($4::timestamptz, $5::text))
ORDER BY r.created_at DESC, r.id DESC
LIMIT $3;

-- name: operator_get_run
-- The operator console: any tenant's run, every column.
SELECT r.* FROM runs r WHERE r.id = $1;

-- name: runs_ledger_entries
-- The operator console: the ledger entries of a run (its page) or of a page of
-- runs (AUDIT_REQUIRED) in one query (ledger_one_entry_per_run_kind probes
-- each run), each run's in the order written.
SELECT run_id, id, kind, amount_usd_micros, operation_id, created_at
FROM ledger_entries
WHERE run_id = ANY($1::text[])
ORDER BY run_id, id;

-- name: usage_by_day_all
-- usage_by_day over every tenant (the operator console's usage page).
SELECT (r.created_at AT TIME ZONE 'UTC')::date AS day,
       r.pack_type,
       count(*) AS runs,
       COALESCE(sum(r.charged_usd_micros), 0)::bigint AS charged_usd_micros,
       COALESCE(sum(r.refunded_usd_micros), 0)::bigint AS refunded_usd_micros
FROM runs r
WHERE r.created_at >= ($1::date)::timestamp AT TIME ZONE 'UTC'
  AND r.created_at < (($2::date) + 1)::timestamp AT TIME ZONE 'UTC'
GROUP BY 1, 2
ORDER BY 1, 2;

-- name: waiting_by_pack
-- /metrics (dpp.runs.gauges): the deployment's queue and AUDIT_REQUIRED runs by pack.
-- Two arms, so each reads its own partial index (runs_queued, runs_audit_required)
-- and the cost follows the rows counted, not the size of the runs table.
SELECT 'QUEUED' AS status, pack_type, count(*)::bigint AS runs,
       EXTRACT(EPOCH FROM (now() - min(created_at)))::float8 AS oldest_age_sec
FROM runs WHERE status = 'QUEUED' GROUP BY pack_type
UNION ALL
SELECT 'AUDIT_REQUIRED', pack_type, count(*)::bigint,
       EXTRACT(EPOCH FROM (now() - min(created_at)))::float8
FROM runs WHERE status = 'AUDIT_REQUIRED' GROUP BY pack_type;
