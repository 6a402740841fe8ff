-- A keyed submit's idempotency record written in its reservation's
-- transaction (issue 11): one statement and one commit less per submit.
--
-- Before, a keyed POST /v1/runs first inserted its idempotency record (its
-- own transaction), then reserved. Now the reservation claims the key itself:
-- after the tenant lock, each draft that carries a claim inserts its key
-- in flight, owned by its request, unless a record exists (ON CONFLICT DO
-- NOTHING); the locks and the ownership check that follow are the ones of
-- 0007, unchanged. A draft whose key was already there is withdrawn (not
-- owned) and its request takes the old path (dpp.runs.idempotency.begin:
-- replay, in flight, mismatch or takeover), so nothing about a key's outcome
-- changes: the first request to store one owns it. A claimed record commits
-- with the run and its stored 202, or with the reservation's refusal (then
-- the request stores its 402 or releases the key), or not at all (a rollback
-- leaves no record behind, where the old path left one to release).
--
-- The 0007 signature stays, as a call of this one with no claims, so a
-- replica of the previous release keeps working while replicas are replaced.

CREATE FUNCTION dpp_lock_reservation(
    p_tenant_id TEXT,
    p_methods TEXT[], p_paths TEXT[], p_keys TEXT[],
    p_api_key_ids TEXT[],
    p_remaining_ms DOUBLE PRECISION[],
    p_claim_sha256 BYTEA[], p_claim_owners UUID[], p_claim_lock_s DOUBLE PRECISION[],
    OUT tenant_found BOOLEAN,
    OUT balance_usd_micros BIGINT, OUT reserved_usd_micros BIGINT, OUT ledger_version BIGINT,
    OUT max_concurrent_runs INTEGER, OUT retention_days INTEGER,
    OUT key_methods TEXT[], OUT key_paths TEXT[], OUT key_keys TEXT[],
    OUT key_states TEXT[], OUT key_owners UUID[],
    OUT spend_key_ids TEXT[], OUT spend_limits BIGINT[], OUT spend_spent BIGINT[],
    OUT open_runs BIGINT, OUT bound_ms BIGINT
) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    waited_ms DOUBLE PRECISION;
    earliest_ms DOUBLE PRECISION;
BEGIN
    SELECT t.balance_usd_micros, t.reserved_usd_micros, t.ledger_version,
           p.max_concurrent_runs, p.retention_days
    INTO balance_usd_micros, reserved_usd_micros, ledger_version,
         max_concurrent_runs, retention_days
    FROM tenants t JOIN plans p ON p.id = t.plan_id
    WHERE t.id = p_tenant_id
    FOR UPDATE OF t;
    tenant_found := FOUND;
    IF NOT tenant_found THEN
        RETURN;
    END IF;

    -- the claims (p_claim_* align with p_methods/p_paths/p_keys; a NULL
    -- sha256 is a key its request already holds): a record that exists, or
    -- an earlier claim of the same key in this batch, wins
    INSERT INTO idempotency_keys (tenant_id, method, path, key, request_sha256, state,
                                  locked_until, owner_token)
    SELECT p_tenant_id, claim.method, claim.path, claim.key, claim.sha256, 'in_flight',
           now() + make_interval(secs => claim.lock_s), claim.owner
    FROM unnest(p_methods, p_paths, p_keys, p_claim_sha256, p_claim_owners, p_claim_lock_s)
         WITH ORDINALITY AS claim(method, path, key, sha256, owner, lock_s, position)
    WHERE claim.sha256 IS NOT NULL
    ORDER BY claim.position
    ON CONFLICT DO NOTHING;

    -- a takeover, a release or a stored 402 waits for the reservation's
    -- commit, and sees its outcome
    SELECT array_agg(locked.method), array_agg(locked.path), array_agg(locked.key),
           array_agg(locked.state), array_agg(locked.owner_token)
    INTO key_methods, key_paths, key_keys, key_states, key_owners
    FROM (SELECT k.method, k.path, k.key, k.state, k.owner_token
          FROM idempotency_keys k
          WHERE k.tenant_id = p_tenant_id
            AND (k.method, k.path, k.key) IN (
                SELECT * FROM unnest(p_methods, p_paths, p_keys))
          ORDER BY k.method, k.path, k.key
          FOR UPDATE OF k) AS locked;

    SELECT array_agg(locked.id), array_agg(locked.spend_limit_usd_micros),
           array_agg(locked.spent_usd_micros)
    INTO spend_key_ids, spend_limits, spend_spent
    FROM (SELECT a.id, a.spend_limit_usd_micros, a.spent_usd_micros
          FROM api_keys a
          WHERE a.tenant_id = p_tenant_id AND a.id = ANY(p_api_key_ids)
          ORDER BY a.id
          FOR UPDATE) AS locked;

    SELECT count(*) INTO open_runs FROM runs
    WHERE tenant_id = p_tenant_id AND status IN ('QUEUED', 'PROCESSING', 'CLAIMED');

    waited_ms := extract(epoch FROM clock_timestamp() - statement_timestamp()) * 1000;
    SELECT min(remaining) INTO earliest_ms
    FROM unnest(p_remaining_ms) AS remaining
    WHERE remaining > waited_ms;
    IF earliest_ms IS NOT NULL THEN
        -- whole milliseconds, at least 1: 0 would mean no limit
        bound_ms := greatest(1, floor(earliest_ms - waited_ms))::BIGINT;
        PERFORM set_config('statement_timeout', bound_ms || 'ms', true);
    END IF;
END
$$;

-- 0007's signature: the same call without claims.
CREATE OR REPLACE FUNCTION dpp_lock_reservation(
    p_tenant_id TEXT,
    p_methods TEXT[], p_paths TEXT[], p_keys TEXT[],
    p_api_key_ids TEXT[],
    p_remaining_ms DOUBLE PRECISION[],
    OUT tenant_found BOOLEAN,
    OUT balance_usd_micros BIGINT, OUT reserved_usd_micros BIGINT, OUT ledger_version BIGINT,
    OUT max_concurrent_runs INTEGER, OUT retention_days INTEGER,
    OUT key_methods TEXT[], OUT key_paths TEXT[], OUT key_keys TEXT[],
    OUT key_states TEXT[], OUT key_owners UUID[],
    OUT spend_key_ids TEXT[], OUT spend_limits BIGINT[], OUT spend_spent BIGINT[],
    OUT open_runs BIGINT, OUT bound_ms BIGINT
) LANGUAGE sql VOLATILE AS $$
    SELECT * FROM dpp_lock_reservation(
        p_tenant_id, p_methods, p_paths, p_keys, p_api_key_ids, p_remaining_ms,
        NULL::bytea[], NULL::uuid[], NULL::double precision[]);
$$;
