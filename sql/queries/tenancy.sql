-- Tenancy: plans, tenants, API keys (dpp/tenancy.py owns every statement here).

-- name: plan_insert
-- A duplicate id returns no row (ON CONFLICT DO NOTHING): the caller maps it to 409.
INSERT INTO plans (id, requests_per_minute, max_concurrent_runs, retention_days)
VALUES ($1, $2, $3, $4)
ON CONFLICT (id) DO NOTHING
RETURNING id, requests_per_minute, max_concurrent_runs, retention_days, created_at, updated_at;

-- name: plan_by_id
SELECT id, requests_per_minute, max_concurrent_runs, retention_days, created_at, updated_at
FROM plans
WHERE id = $1;

-- name: plan_update
UPDATE plans
SET requests_per_minute = $2, max_concurrent_runs = $3, retention_days = $4, updated_at = now()
WHERE id = $1
RETURNING id, requests_per_minute, max_concurrent_runs, retention_days, created_at, updated_at;

-- name: tenant_insert
-- Inserts only when the plan exists, so an unknown plan is "no row" rather
-- than a foreign-key error; returns the tenant with its plan.
WITH inserted AS (
    INSERT INTO tenants (id, name, plan_id)
    SELECT $1, $2, plans.id FROM plans WHERE plans.id = $3
    RETURNING id, name, plan_id, created_at
)
SELECT inserted.id, inserted.name, inserted.plan_id, inserted.created_at,
       plans.requests_per_minute, plans.max_concurrent_runs, plans.retention_days,
       plans.created_at AS plan_created_at, plans.updated_at AS plan_updated_at
FROM inserted
JOIN plans ON plans.id = inserted.plan_id;

-- name: tenant_with_plan
SELECT tenants.id, tenants.name, tenants.plan_id, tenants.created_at,
       plans.requests_per_minute, plans.max_concurrent_runs, plans.retention_days,
       plans.created_at AS plan_created_at, plans.updated_at AS plan_updated_at
FROM tenants
JOIN plans ON plans.id = tenants.plan_id
WHERE tenants.id = $1;

-- name: tenant_set_plan
-- No row: the tenant or the plan does not exist (the caller tells which).
UPDATE tenants
SET plan_id = plans.id
FROM plans
WHERE tenants.id = $1 AND plans.id = $2
RETURNING tenants.id;

-- name: api_key_insert
-- Inserts only when the tenant exists; no row means an unknown tenant.
INSERT INTO api_keys (id, tenant_id, name, key_sha256, key_hint, requests_per_minute,
                      spend_limit_usd_micros)
SELECT $1, tenants.id, $3, $4, $5, $6, $7 FROM tenants WHERE tenants.id = $2
RETURNING id, tenant_id, name, key_hint, requests_per_minute, created_at, last_used_at,
          revoked_at, spend_limit_usd_micros, spent_usd_micros;

-- name: api_key_by_id
SELECT id, tenant_id, name, key_hint, requests_per_minute, created_at, last_used_at, revoked_at,
       spend_limit_usd_micros, spent_usd_micros
FROM api_keys
WHERE id = $1;

-- name: api_key_set_spend_limit
-- Only a live key (no row: unknown or revoked). A limit below spent is allowed:
-- it stops further reservations only (SPEC §7); the row lock orders it with them.
UPDATE api_keys
SET spend_limit_usd_micros = $2
WHERE id = $1 AND revoked_at IS NULL
RETURNING id, tenant_id, name, key_hint, requests_per_minute, created_at, last_used_at,
          revoked_at, spend_limit_usd_micros, spent_usd_micros;

-- name: api_key_revoke
-- Idempotent: a second revoke keeps the first revoked_at.
UPDATE api_keys
SET revoked_at = coalesce(revoked_at, now())
WHERE id = $1
RETURNING id, tenant_id, name, key_hint, requests_per_minute, created_at, last_used_at,
          revoked_at, spend_limit_usd_micros, spent_usd_micros, key_sha256;

-- name: api_key_authenticate
-- One round trip: the key (by the unique hash index), its tenant's plan, and
-- last_used_at refreshed only when older than $2 seconds, so a busy key
-- costs at most one row write a minute however many replicas look it up.
-- (A data-modifying CTE runs to completion even though nothing reads it.)
WITH found AS (
    SELECT id, tenant_id, key_sha256, requests_per_minute, revoked_at
    FROM api_keys
    WHERE key_sha256 = $1
), touched AS (
    UPDATE api_keys
    SET last_used_at = now()
    FROM found
    WHERE api_keys.id = found.id
      AND api_keys.revoked_at IS NULL
      AND (api_keys.last_used_at IS NULL
           OR api_keys.last_used_at < now() - make_interval(secs => $2))
)
SELECT found.id AS key_id, found.tenant_id, found.key_sha256,
       found.requests_per_minute AS key_requests_per_minute, found.revoked_at,
       tenants.plan_id, plans.requests_per_minute, plans.max_concurrent_runs,
       plans.retention_days
FROM found
JOIN tenants ON tenants.id = found.tenant_id
JOIN plans ON plans.id = tenants.plan_id;

-- name: tenant_search
-- The operator console's tenant search: an exact id, or a name containing $1
-- (case-insensitive; $1 arrives with LIKE's wildcards escaped); newest first.
SELECT tenants.id, tenants.name, tenants.plan_id, tenants.created_at,
       plans.requests_per_minute, plans.max_concurrent_runs, plans.retention_days,
       plans.created_at AS plan_created_at, plans.updated_at AS plan_updated_at
FROM tenants
JOIN plans ON plans.id = tenants.plan_id
WHERE tenants.id = $2 OR tenants.name ILIKE '%' || $1 || '%' ESCAPE '\'
ORDER BY tenants.created_at DESC, tenants.id DESC
LIMIT $3;

-- name: api_keys_of_tenant
-- Every key of the tenant (revoked ones too), newest first.
SELECT id, tenant_id, name, key_hint, requests_per_minute, created_at, last_used_at, revoked_at,
       spend_limit_usd_micros, spent_usd_micros
FROM api_keys
WHERE tenant_id = $1
ORDER BY created_at DESC, id DESC
LIMIT $2;
