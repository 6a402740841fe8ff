-- The tenant's open runs, counted on its row (issue 11).
--
-- A reservation decides the plan's concurrency limit on the number of the
-- tenant's open runs (QUEUED, PROCESSING, CLAIMED; SPEC §6: AUDIT_REQUIRED does
-- not count). dpp_lock_reservation counted them with count(*) on every batch,
-- while it held the tenant's row: one index entry and one heap visit per open
-- run, and a settled run's dead entry until vacuum. The time grew with the
-- tenant's backlog, and every reservation of the tenant waited behind it:
-- 1.5 ms per batch with 10,000 queued runs on an idle server, 2.4 ms of the
-- function's own time under POST c=64 (a plan may allow 100,000 open runs).
--
-- tenants.open_runs holds the count instead. Only the statement triggers on
-- runs below move it, by the runs each INSERT or UPDATE statement opened or
-- closed, one UPDATE of each tenant touched per statement (in
-- tenant id order, as the ledger trigger locks them); a statement that opens
-- or closes nothing writes no tenant. A client statement cannot set it
-- (tenants_open_runs_from_runs_only, as the money counters are kept), the
-- CHECK keeps it >= 0, and the audit compares it with the runs (invariant 2's
-- report, dpp/money/audit.py). dpp_lock_reservation reads it under the
-- tenant's row lock it already takes; its signature and every other
-- statement in it are as they were, so a replica of the previous release
-- keeps working beside this one during a rolling deploy (its runs are counted
-- by the same triggers).
--
-- The lock order stays runs, then tenants, each statement's tenants in id
-- order: a settlement's UPDATE of its runs now locks all its tenants at its
-- end (an AUDIT_REQUIRED run's too, though its count does not move) instead
-- of at its ledger insert, which then finds them held; a reservation locks
-- its tenant first and only inserts runs; a claim, a lease renewal or a
-- release moves no run in or out of the open set and locks no tenant.

-- No run opens or closes while the count is taken and the triggers created.
LOCK TABLE runs IN SHARE ROW EXCLUSIVE MODE;
LOCK TABLE tenants IN SHARE ROW EXCLUSIVE MODE;

ALTER TABLE tenants ADD COLUMN open_runs INTEGER NOT NULL DEFAULT 0
    CONSTRAINT tenants_open_runs_nonnegative CHECK (open_runs >= 0);

UPDATE tenants AS t
SET open_runs = c.open_runs
FROM (SELECT tenant_id, count(*)::integer AS open_runs
      FROM runs
      WHERE status IN ('QUEUED', 'PROCESSING', 'CLAIMED')
      GROUP BY tenant_id) AS c
WHERE t.id = c.tenant_id;

-- One function for both statements: the runs a statement opened count +1 to
-- their tenant, the runs it closed -1. No DELETE trigger: a run is born with
-- its reserve entry, whose foreign key refuses the run's delete, so only a
-- run written with the triggers off (never counted) can be deleted, and
-- counting its delete would take the count below the truth.
CREATE FUNCTION runs_count_open() RETURNS trigger
LANGUAGE plpgsql
SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE tenants AS t
        SET open_runs = t.open_runs + d.opened
        FROM (SELECT tenant_id, count(*)::integer AS opened
              FROM runs_after
              WHERE status IN ('QUEUED', 'PROCESSING', 'CLAIMED')
              GROUP BY tenant_id
              ORDER BY tenant_id) AS d
        WHERE t.id = d.tenant_id;
    ELSIF TG_OP = 'UPDATE' THEN
        -- never below 0: a run restored with the triggers off was never
        -- counted, and its close must not fail on the CHECK (the audit
        -- reports the count out of step; docs/money.md says how to recount)
        UPDATE tenants AS t
        SET open_runs = greatest(0, t.open_runs + d.opened)
        -- An AUDIT_REQUIRED run's tenant is written too (+0): a run leaves
        -- the open set or AUDIT_REQUIRED exactly when it is settled or set
        -- aside, so every tenant the settlement's ledger insert locks next is
        -- locked here first, all in tenant id order, and two settlements
        -- cannot each hold a tenant the other waits for.
        FROM (SELECT moved.tenant_id, sum(moved.opened)::integer AS opened
              FROM (SELECT tenant_id, 1 AS opened, false AS resolved FROM runs_after
                    WHERE status IN ('QUEUED', 'PROCESSING', 'CLAIMED')
                    UNION ALL
                    SELECT tenant_id, -1, false FROM runs_before
                    WHERE status IN ('QUEUED', 'PROCESSING', 'CLAIMED')
                    UNION ALL
                    SELECT tenant_id, 0, true FROM runs_before
                    WHERE status = 'AUDIT_REQUIRED') AS moved
              GROUP BY moved.tenant_id
              HAVING sum(moved.opened) <> 0 OR bool_or(moved.resolved)
              ORDER BY moved.tenant_id) AS d
        WHERE t.id = d.tenant_id;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER runs_count_open_inserted
    AFTER INSERT ON runs
    REFERENCING NEW TABLE AS runs_after
    FOR EACH STATEMENT EXECUTE FUNCTION runs_count_open();

CREATE TRIGGER runs_count_open_updated
    AFTER UPDATE ON runs
    REFERENCING OLD TABLE AS runs_before NEW TABLE AS runs_after
    FOR EACH STATEMENT EXECUTE FUNCTION runs_count_open();

-- open_runs starts at 0 and moves only from inside runs_count_open (trigger
-- depth 2: the runs statement's trigger updates tenants, which fires this
-- one); a client statement runs this at depth 1.
CREATE FUNCTION tenants_open_runs_from_runs_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF pg_trigger_depth() < 2 THEN
        RAISE EXCEPTION 'dpp rule open_runs_from_runs: tenant % open_runs changes only with '
            'its runs', NEW.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER tenants_open_runs_start_at_zero
    BEFORE INSERT ON tenants
    FOR EACH ROW
    WHEN (NEW.open_runs <> 0)
    EXECUTE FUNCTION tenants_open_runs_from_runs_only();

CREATE TRIGGER tenants_open_runs_move_with_runs
    BEFORE UPDATE ON tenants
    FOR EACH ROW
    WHEN (OLD.open_runs IS DISTINCT FROM NEW.open_runs)
    EXECUTE FUNCTION tenants_open_runs_from_runs_only();

-- The partial index the count read; nothing else reads it, and every run's
-- insert and status change wrote it.
DROP INDEX runs_open_by_tenant;

-- 0009's function, reading the count from the locked row instead of counting.
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
    -- (0012) the tenant's open runs, counted by runs_count_open, read under
    -- the row lock every run's insert and close also takes
    SELECT t.balance_usd_micros, t.reserved_usd_micros, t.ledger_version,
           p.max_concurrent_runs, p.retention_days, t.open_runs
    INTO balance_usd_micros, reserved_usd_micros, ledger_version,
         max_concurrent_runs, retention_days, open_runs
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
