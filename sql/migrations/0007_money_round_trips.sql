-- A reservation's statements in two round trips instead of six, and a
-- settlement's writes in one instead of three (issue 11).
--
-- A reservation batch (dpp/money/ledger.py, reserve_batch) is one transaction:
-- lock the tenant row, lock the batch's idempotency keys, lock its API keys'
-- spend, count the tenant's open runs (bounding the writes by the time its
-- callers still wait), then insert the runs and complete their keys. Each of
-- those was a round trip of its own; over loopback on a virtual machine a
-- round trip costs more than the statement, and spread over many tenants
-- (one or two drafts per batch) they bounded the admission rate.
--
-- These two functions run the same statements, in the same order, in the
-- caller's transaction: nothing is decided here. The decision stays with
-- dpp.money.rules between the two calls, and every guard stays where it was
-- (the CHECKs and triggers of 0001/0004/0005 judge the writes). A VOLATILE
-- function takes a new snapshot for each statement under READ COMMITTED, so
-- the count, a statement after the tenant lock, still sees every run committed
-- by the transaction whose lock it waited for.

-- Locks and reads, in lock order: the tenant row, then the batch's
-- idempotency keys in key order, then its API keys in id order (every writer
-- of a key's spent holds the tenant first, so this cannot deadlock). Then the
-- open-run count, and the bound of the statements after it: remaining_ms are
-- how long each caller still waited when the call was sent; the earliest one
-- still waiting, less the time this call has run, bounds the writes (never
-- looser than the earliest admitted caller's: admitted callers are among those
-- still waiting). tenant_found is false (nothing locked) for an unknown tenant.
CREATE FUNCTION dpp_lock_reservation(
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

-- The writes of the admitted drafts. The runs' insert trigger writes their
-- reserve entries, whose trigger adds them to the tenant's reserved: the CHECK
-- refuses the batch unless available stays >= 0 (the guard no Redis answer
-- can bypass); a run's key is charged the same way, and Postgres refuses an
-- increase past the key's limit. Then the completions of the keys locked and
-- checked owned by dpp_lock_reservation (the caller checks every one was
-- completed), and the counters the ledger trigger wrote.
CREATE FUNCTION dpp_write_reservation(
    p_tenant_id TEXT,
    p_run_ids TEXT[], p_pack_types TEXT[], p_inputs JSONB[], p_metadata JSONB[],
    p_reserved BIGINT[], p_minimum BIGINT[], p_timebox INTEGER[], p_trace_ids TEXT[],
    p_created_at TIMESTAMPTZ[], p_api_key_ids TEXT[],
    p_key_methods TEXT[], p_key_paths TEXT[], p_key_keys TEXT[], p_key_statuses INTEGER[],
    p_key_headers JSONB[], p_key_bodies BYTEA[],
    OUT completed BIGINT,
    OUT balance_usd_micros BIGINT, OUT reserved_usd_micros BIGINT, OUT ledger_version BIGINT
) LANGUAGE plpgsql VOLATILE AS $$
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
        WITH done AS (
            UPDATE idempotency_keys AS k
            SET state = 'done', response_status = item.status,
                response_headers = item.headers, response_body = item.body
            FROM unnest(p_key_methods, p_key_paths, p_key_keys, p_key_statuses, p_key_headers,
                        p_key_bodies)
                 AS item(method, path, key, status, headers, body)
            WHERE k.tenant_id = p_tenant_id AND k.method = item.method
              AND k.path = item.path AND k.key = item.key
            RETURNING k.key
        )
        SELECT count(*) INTO completed FROM done;
    END IF;

    SELECT t.balance_usd_micros, t.reserved_usd_micros, t.ledger_version
    INTO balance_usd_micros, reserved_usd_micros, ledger_version
    FROM tenants t WHERE t.id = p_tenant_id;
END
$$;

-- A settlement batch's writes (dpp/money/ledger.py, settle_batch), in one
-- round trip instead of three: the run rows, guarded by the versions read
-- under their row locks (the caller checks the count); the charge and refund
-- entries, whose trigger releases the reservations and charges the balances
-- (the CHECKs judge them; the entries' unique operation ids make a replay
-- impossible); the counters that trigger wrote, per tenant.
CREATE FUNCTION dpp_write_settlements(
    p_run_ids TEXT[], p_statuses TEXT[], p_charged BIGINT[], p_refunded BIGINT[],
    p_retention_days INTEGER[], p_errors JSONB[], p_result_keys TEXT[],
    p_result_sha256 TEXT[], p_result_bytes BIGINT[], p_result_content_types TEXT[],
    p_versions BIGINT[],
    p_entry_tenant_ids TEXT[], p_entry_run_ids TEXT[], p_entry_kinds TEXT[],
    p_entry_amounts BIGINT[],
    OUT settled_ids TEXT[], OUT finished_at TIMESTAMPTZ[],
    OUT tenant_ids TEXT[], OUT balances_usd_micros BIGINT[], OUT reserved_usd_micros BIGINT[],
    OUT ledger_versions BIGINT[]
) LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    WITH settled AS (
        UPDATE runs AS r
        SET status = item.status,
            charged_usd_micros = item.charged,
            refunded_usd_micros = item.refunded,
            finished_at = now(),
            retention_until = now() + make_interval(days => item.retention_days),
            lease_token = NULL,
            lease_expires_at = NULL,
            error = item.error,
            result_key = COALESCE(item.result_key, r.result_key),
            result_sha256 = COALESCE(item.result_sha256, r.result_sha256),
            result_bytes = COALESCE(item.result_bytes, r.result_bytes),
            result_content_type = COALESCE(item.result_content_type, r.result_content_type),
            version = r.version + 1
        FROM unnest(p_run_ids, p_statuses, p_charged, p_refunded, p_retention_days, p_errors,
                    p_result_keys, p_result_sha256, p_result_bytes, p_result_content_types,
                    p_versions)
             AS item(id, status, charged, refunded, retention_days, error, result_key,
                     result_sha256, result_bytes, result_content_type, version)
        WHERE r.id = item.id AND r.version = item.version
        RETURNING r.id, r.finished_at
    )
    SELECT array_agg(settled.id), array_agg(settled.finished_at)
    INTO settled_ids, finished_at
    FROM settled;

    INSERT INTO ledger_entries (tenant_id, run_id, kind, amount_usd_micros, operation_id)
    SELECT item.tenant_id, item.run_id, item.kind, item.amount, item.kind || ':' || item.run_id
    FROM unnest(p_entry_tenant_ids, p_entry_run_ids, p_entry_kinds, p_entry_amounts)
         AS item(tenant_id, run_id, kind, amount);

    SELECT array_agg(t.id), array_agg(t.balance_usd_micros), array_agg(t.reserved_usd_micros),
           array_agg(t.ledger_version)
    INTO tenant_ids, balances_usd_micros, reserved_usd_micros, ledger_versions
    FROM tenants t
    WHERE t.id = ANY(p_entry_tenant_ids);
END
$$;
