-- Execution: claiming queued runs, leases, the two-phase finalize, the
-- reconciler's scans. Every write is guarded (status, lease token, version)
-- and the caller checks that a row came back: a write that matches nothing
-- means someone else moved the run first, and the caller must not act as if
-- it had won.

-- name: claim_queued_runs
-- The Postgres queue: oldest QUEUED first; SKIP LOCKED lets replicas claim
-- side by side without waiting on each other's rows. The pick is a
-- MATERIALIZED CTE, not `id IN (subquery)`: the planner may rescan such a
-- subquery, and each rescan would SKIP LOCKED its way to further rows, claiming
-- more than the LIMIT.
WITH picked AS MATERIALIZED (
    SELECT id FROM runs
    WHERE status = 'QUEUED'
    ORDER BY created_at, id
    FOR UPDATE SKIP LOCKED
    LIMIT $1
)
UPDATE runs AS r
SET status = 'PROCESSING',
    lease_token = gen_random_uuid(),
    lease_expires_at = now() + make_interval(secs => $2),
    started_at = now(),
    attempts = r.attempts + 1,
    version = r.version + 1
FROM picked
WHERE r.id = picked.id AND r.status = 'QUEUED'
RETURNING r.id, r.tenant_id, r.pack_type, r.inputs, r.timebox_sec, r.reserved_usd_micros,
          r.minimum_fee_usd_micros, r.trace_id, r.version, r.lease_token, r.attempts;

-- name: claim_run_by_id
-- The SQS queue: a message names its run; only a QUEUED run is claimed.
UPDATE runs
SET status = 'PROCESSING',
    lease_token = gen_random_uuid(),
    lease_expires_at = now() + make_interval(secs => $2),
    started_at = now(),
    attempts = attempts + 1,
    version = version + 1
WHERE id = $1 AND status = 'QUEUED'
RETURNING id, tenant_id, pack_type, inputs, timebox_sec, reserved_usd_micros,
          minimum_fee_usd_micros, trace_id, version, lease_token, attempts;

-- name: renew_lease
-- The heartbeat: loses (no row) once the run was reaped, released or re-claimed.
UPDATE runs
SET lease_expires_at = now() + make_interval(secs => $4),
    version = version + 1
WHERE id = $1 AND lease_token = $2 AND status = 'PROCESSING' AND version = $3
RETURNING version;

-- name: claim_for_finalize
-- Finalize phase 1: PROCESSING -> CLAIMED. The lease token stays on the row so
-- the settlement (phase 3) can still prove it comes from this worker.
UPDATE runs
SET status = 'CLAIMED',
    claimed_at = now(),
    version = version + 1
WHERE id = $1 AND lease_token = $2 AND status = 'PROCESSING' AND version = $3
RETURNING version;

-- name: release_run
-- Shutdown: give an unfinished run back, as if never claimed (nothing charged,
-- the timebox starts again at the next claim). Guarded by the lease token only:
-- a heartbeat cut short by the shutdown may have moved the version. enqueued_at
-- is cleared so that, with SQS, the backstop re-announces the run if the fresh
-- message cannot be sent.
UPDATE runs
SET status = 'QUEUED',
    lease_token = NULL,
    lease_expires_at = NULL,
    started_at = NULL,
    enqueued_at = NULL,
    version = version + 1
WHERE id = $1 AND lease_token = $2 AND status = 'PROCESSING'
RETURNING version;

-- name: mark_runs_enqueued
UPDATE runs SET enqueued_at = now()
WHERE id = ANY($1::text[]) AND status = 'QUEUED';

-- name: queued_runs_unsent
-- Backstop of the SQS backend: committed QUEUED runs whose message was never
-- sent ($1), or was sent so long ago ($3) that it may be lost (retention, a
-- purge, a dead-letter queue that expired it) while nothing claimed the run.
SELECT id, tenant_id, pack_type, trace_id, created_at
FROM runs
WHERE status = 'QUEUED'
  AND ((enqueued_at IS NULL AND created_at < now() - make_interval(secs => $1))
       OR enqueued_at < now() - make_interval(secs => $3))
ORDER BY created_at
LIMIT $2;

-- name: run_by_id
-- Any tenant's run (operator and reconciler paths; the tenant API uses get_run).
SELECT id, tenant_id, status, version, reserved_usd_micros, trace_id FROM runs WHERE id = $1;

-- name: lapsed_leases
-- The reaper's candidates. The version observed here guards the settlement, so
-- a heartbeat that renews in between wins. (trace_id: the reaping is a span of
-- the run's trace.)
SELECT r.id, r.tenant_id, r.version, r.trace_id,
       EXISTS (SELECT 1 FROM ledger_entries e WHERE e.run_id = r.id AND e.kind = 'reserve')
           AS has_reserve
FROM runs r
WHERE r.status = 'PROCESSING' AND r.lease_expires_at < now()
ORDER BY r.lease_expires_at
LIMIT $1;

-- name: stuck_claimed_runs
-- Finalize died between its phases: CLAIMED for longer than the threshold.
SELECT r.id, r.tenant_id, r.version, r.trace_id,
       EXISTS (SELECT 1 FROM ledger_entries e WHERE e.run_id = r.id AND e.kind = 'reserve')
           AS has_reserve
FROM runs r
WHERE r.status = 'CLAIMED' AND r.claimed_at < now() - make_interval(secs => $1)
ORDER BY r.claimed_at
LIMIT $2;

-- name: results_past_retention
SELECT id, result_key FROM runs
WHERE result_key IS NOT NULL AND result_deleted_at IS NULL AND retention_until < now()
ORDER BY retention_until
LIMIT $1;

-- name: mark_result_deleted
-- After the object is gone: a crash before this line only means the (idempotent)
-- delete runs again on the next pass.
UPDATE runs
SET result_deleted_at = now(), version = version + 1
WHERE id = $1 AND result_key = $2 AND result_deleted_at IS NULL AND retention_until < now()
RETURNING id;
