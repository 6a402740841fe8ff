-- The money functions look rows up by key, whatever the planner believed
-- when it planned them (issue 11).
--
-- PL/pgSQL plans each statement of a function once per connection and keeps
-- the plan until an ANALYZE (or DDL) invalidates it; a prepared statement's
-- generic plan is kept the same way. A connection that reserved and settled
-- its first runs while runs, ledger_entries and idempotency_keys were nearly
-- empty (a new database, or statistics autovacuum had not refreshed yet)
-- planned hash joins over sequential scans of those tables, and went on
-- scanning them whole on every reservation and settlement as they grew:
-- measured, 5 ms a settlement after 4,000 runs and growing with the table,
-- every reservation of the tenant queued behind it in its budget actor (a
-- submit at one client: 9 ms on a fresh table, 17-24 ms after a burst of
-- 4,000). A VACUUM ANALYZE made it fast again, until the next time. Three
-- statements scanned a whole table whatever the statistics said: the
-- reservation's key lock and its keys' completion read every key of the
-- tenant and matched them to the batch's, and the ledger trigger's check
-- that a charge's run was reserved ran as a hashed subplan over every reserve
-- entry.
--
-- Each statement of these functions touches a batch of at most a few dozen
-- rows, found by primary key or a unique index (runs.id, ledger_entries'
-- (run_id, kind), tenants.id, api_keys.id, idempotency_keys' key); the one
-- right plan is a nested loop of index probes, at any table size. So:
--  * sequential scans, hash joins and merge joins are off inside them (the
--    planner still falls back to a sequential scan where no index exists;
--    none of these statements has such a table), and so is JIT, which a
--    plan priced with a disabled node would otherwise trigger;
--  * the three statements above probe by key: the batch's keys (sorted, the
--    lock order) joined LATERAL to their rows; a LEFT JOIN to the reserve
--    entry instead of NOT EXISTS inside an OR;
--  * a settlement's run lock and a burst's reads of runs (the statements
--    lock_runs and owned_runs, whose generic plans had the same fault: the
--    reads scanned every run of the tenant) are functions, to carry the
--    settings; a lone read (owned_run) is one primary-key probe of runs.
-- Set per function, the settings change nothing outside it, and a SET LOCAL
-- of another setting inside (dpp_lock_reservation's statement_timeout) is
-- kept. Every guard is the statement it was: the same locks in the same
-- order, the same checks, the same errors.

CREATE OR REPLACE FUNCTION dpp_lock_reservation(
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
) LANGUAGE plpgsql VOLATILE
SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off
AS $$
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
    -- (0009) each key probed by its primary key, in key order (the lock order)
    FROM (SELECT wanted.method, wanted.path, wanted.key
          FROM unnest(p_methods, p_paths, p_keys) AS wanted(method, path, key)
          GROUP BY wanted.method, wanted.path, wanted.key
          ORDER BY wanted.method, wanted.path, wanted.key) AS wanted
    CROSS JOIN LATERAL (
          SELECT k.method, k.path, k.key, k.state, k.owner_token
          FROM idempotency_keys k
          WHERE k.tenant_id = p_tenant_id AND k.method = wanted.method
            AND k.path = wanted.path AND k.key = wanted.key
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

CREATE OR REPLACE FUNCTION dpp_write_reservation(
    p_tenant_id TEXT,
    p_run_ids TEXT[], p_pack_types TEXT[], p_inputs JSONB[], p_metadata JSONB[],
    p_reserved BIGINT[], p_minimum BIGINT[], p_timebox INTEGER[], p_trace_ids TEXT[],
    p_created_at TIMESTAMPTZ[], p_api_key_ids TEXT[],
    p_key_methods TEXT[], p_key_paths TEXT[], p_key_keys TEXT[], p_key_statuses INTEGER[],
    p_key_headers JSONB[], p_key_bodies BYTEA[],
    OUT completed BIGINT,
    OUT balance_usd_micros BIGINT, OUT reserved_usd_micros BIGINT, OUT ledger_version BIGINT
) LANGUAGE plpgsql VOLATILE
SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off
AS $$
BEGIN
    INSERT INTO runs (id, tenant_id, pack_type, status, inputs, metadata,
                      reserved_usd_micros, minimum_fee_usd_micros, timebox_sec,
                      trace_id, created_at, api_key_id)
    SELECT id, p_tenant_id, pack_type, 'QUEUED', inputs, metadata, reserved, minimum, timebox,
           trace_id, created_at, api_key_id
    FROM unnest(p_run_ids, p_pack_types, p_inputs, p_metadata, p_reserved, p_minimum,
                p_timebox, p_trace_ids, p_created_at, p_api_key_ids)
         AS item(id, pack_type, inputs, metadata, reserved, minimum, timebox, trace_id,
                 created_at, api_key_id);

    completed := 0;
    IF cardinality(p_key_keys) > 0 THEN
        -- (0009) each key found by its primary key, then written by its row
        -- (the lock call holds every one of them)
        WITH found AS MATERIALIZED (
            SELECT k.row_id, item.status, item.headers, item.body
            FROM unnest(p_key_methods, p_key_paths, p_key_keys, p_key_statuses, p_key_headers,
                        p_key_bodies)
                 AS item(method, path, key, status, headers, body)
            CROSS JOIN LATERAL (
                SELECT k.ctid AS row_id FROM idempotency_keys k
                WHERE k.tenant_id = p_tenant_id AND k.method = item.method
                  AND k.path = item.path AND k.key = item.key
                OFFSET 0) AS k
        ), done AS (
            UPDATE idempotency_keys AS k
            SET state = 'done', response_status = found.status,
                response_headers = found.headers, response_body = found.body
            FROM found
            WHERE k.ctid = found.row_id
            RETURNING k.key
        )
        SELECT count(*) INTO completed FROM done;
    END IF;

    SELECT t.balance_usd_micros, t.reserved_usd_micros, t.ledger_version
    INTO balance_usd_micros, reserved_usd_micros, ledger_version
    FROM tenants t WHERE t.id = p_tenant_id;
END
$$;

CREATE OR REPLACE FUNCTION ledger_entries_apply() RETURNS trigger
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off
AS $$
DECLARE
    bad RECORD;
BEGIN
    -- At depth >= 2 the entries come from runs_reserve_in_ledger, which derives
    -- them from the inserted runs: they match by construction, and skipping the
    -- join keeps a batch of reservations as cheap as before the rules.
    IF pg_trigger_depth() < 2 THEN
    SELECT e.kind, e.run_id, e.amount_usd_micros, r.status INTO bad
    FROM inserted_entries e
    LEFT JOIN runs r ON r.id = e.run_id
    -- (0009) a join, not NOT EXISTS inside the OR: Postgres ran that as a
    -- hashed subplan reading every reserve entry of the ledger
    LEFT JOIN ledger_entries h
        ON h.run_id = e.run_id AND h.run_id IS NOT NULL AND h.kind = 'reserve'
    WHERE e.run_id IS NOT NULL AND (
        r.id IS NULL
        OR r.tenant_id <> e.tenant_id
        OR (e.kind = 'reserve'
            AND (r.status <> 'QUEUED' OR e.amount_usd_micros <> r.reserved_usd_micros))
        OR (e.kind = 'charge'
            AND (r.status NOT IN ('COMPLETED', 'FAILED', 'EXPIRED', 'CANCELED')
                 OR e.amount_usd_micros IS DISTINCT FROM r.charged_usd_micros))
        OR (e.kind = 'refund'
            AND (r.status NOT IN ('COMPLETED', 'FAILED', 'EXPIRED', 'CANCELED')
                 OR e.amount_usd_micros IS DISTINCT FROM r.refunded_usd_micros))
        OR (e.kind IN ('charge', 'refund') AND h.run_id IS NULL)
    )
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'dpp rule entry_matches_run: a % entry of % for run % (%) does not '
            'match the run', bad.kind, bad.amount_usd_micros, bad.run_id,
            coalesce(bad.status, 'no such run')
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    END IF;

    UPDATE tenants AS t
    SET balance_usd_micros = t.balance_usd_micros + d.balance_delta,
        reserved_usd_micros = t.reserved_usd_micros + d.reserved_delta,
        ledger_version = t.ledger_version + 1
    FROM (
        SELECT tenant_id,
               sum(CASE kind WHEN 'credit' THEN amount_usd_micros
                             WHEN 'charge' THEN -amount_usd_micros
                             ELSE 0 END)::bigint AS balance_delta,
               sum(CASE kind WHEN 'reserve' THEN amount_usd_micros
                             WHEN 'credit' THEN 0
                             ELSE -amount_usd_micros END)::bigint AS reserved_delta
        FROM inserted_entries
        GROUP BY tenant_id
        ORDER BY tenant_id
    ) AS d
    WHERE t.id = d.tenant_id;

    -- The keys' spent, after the tenants (every writer locks a tenant before
    -- its keys): + R per reserve, - the refund per refund; a charge was spent
    -- when it was reserved. api_keys_spend_within_limit judges the increase.
    UPDATE api_keys AS k
    SET spent_usd_micros = k.spent_usd_micros + d.spent_delta
    FROM (
        SELECT r.api_key_id,
               sum(CASE e.kind WHEN 'reserve' THEN e.amount_usd_micros
                               ELSE -e.amount_usd_micros END)::bigint AS spent_delta
        FROM inserted_entries e
        -- (0009) each entry's run probed by its id (OFFSET 0 keeps the order)
        CROSS JOIN LATERAL (
            SELECT r.api_key_id FROM runs r WHERE r.id = e.run_id OFFSET 0) AS r
        WHERE e.kind IN ('reserve', 'refund') AND r.api_key_id IS NOT NULL
        GROUP BY r.api_key_id
        ORDER BY r.api_key_id
    ) AS d
    WHERE k.id = d.api_key_id AND d.spent_delta <> 0;
    RETURN NULL;
END;
$$;

-- (0009) A settlement batch's runs, locked in id order (two batches locking
-- overlapping runs cannot deadlock), with their plan's retention; was the
-- statement lock_runs.
CREATE FUNCTION dpp_lock_runs(p_run_ids TEXT[])
RETURNS TABLE (id TEXT, tenant_id TEXT, status TEXT, version BIGINT, lease_token UUID,
               reserved_usd_micros BIGINT, minimum_fee_usd_micros BIGINT,
               charged_usd_micros BIGINT, refunded_usd_micros BIGINT, retention_days INTEGER)
LANGUAGE plpgsql VOLATILE
SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off
AS $$
BEGIN
    RETURN QUERY
    SELECT r.id, r.tenant_id, r.status, r.version, r.lease_token, r.reserved_usd_micros,
           r.minimum_fee_usd_micros, r.charged_usd_micros, r.refunded_usd_micros,
           p.retention_days
    FROM runs r JOIN tenants t ON t.id = r.tenant_id JOIN plans p ON p.id = t.plan_id
    WHERE r.id = ANY(p_run_ids)
    ORDER BY r.id
    FOR UPDATE OF r;
END
$$;

-- (0009) GET /v1/runs/{id} for every reader of a burst at once (the statement
-- owned_runs, dpp.runs.reads): the run of each (tenant, id) pair, only where it
-- is that tenant's; a pair asked twice is one row.
CREATE FUNCTION dpp_owned_runs(p_tenant_ids TEXT[], p_run_ids TEXT[])
RETURNS SETOF runs
LANGUAGE plpgsql STABLE
SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off
AS $$
BEGIN
    RETURN QUERY
    SELECT found.*
    FROM (SELECT DISTINCT pair.tenant_id, pair.id
          FROM unnest(p_tenant_ids, p_run_ids) AS pair(tenant_id, id)) AS pair
    CROSS JOIN LATERAL (
        SELECT r.* FROM runs r
        WHERE r.id = pair.id AND r.tenant_id = pair.tenant_id
        OFFSET 0) AS found;
END
$$;

ALTER FUNCTION dpp_write_settlements(
    TEXT[], TEXT[], BIGINT[], BIGINT[], INTEGER[], JSONB[], TEXT[], TEXT[], BIGINT[],
    TEXT[], BIGINT[], TEXT[], TEXT[], TEXT[], BIGINT[])
    SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off;

ALTER FUNCTION runs_reserve_in_ledger()
    SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off;

ALTER FUNCTION runs_settled_in_ledger()
    SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off;
