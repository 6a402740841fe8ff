-- A reservation batch in one statement (issue 11).
--
-- A reservation was four round trips on one connection: BEGIN (with the
-- statement bound), dpp_lock_reservation, the admission decision in Python,
-- dpp_write_reservation, COMMIT. Postgres's own time for them is small (about
-- 1 ms in all); the waits between them are not: each round trip costs the
-- replica a turn of its event loop, measured at 0.6-1.0 ms apiece on a loaded
-- two-core machine, while the tenant's row stays locked and the tenant's next
-- batch waits. dpp_reserve takes the same locks by calling
-- dpp_lock_reservation, decides each draft by the rule of
-- dpp.money.rules.decide_batch, and writes the admitted ones by calling
-- dpp_write_reservation, all in one statement: one round trip, and a
-- transaction of its own (the caller sends it outside BEGIN; its commit ends
-- the statement).
--
-- The decision made here is checked, not trusted: the function returns the
-- locked state it decided on (the tenant's counters, open runs, the keys'
-- owners and spend) and dpp/money/ledger.py decides the batch again with
-- decide_batch and asserts both agree. Every guard below it stands as it
-- was: the tenant row lock, the key locks and ownership, the schema's CHECKs
-- on tenants and api_keys, and the ledger trigger, so a wrong decision here
-- could not overspend either.
--
-- The caller's deadline: the lock waits are bounded by the latest caller's
-- time left (lock_timeout, local to this statement's transaction); once the
-- locks are held, a draft whose caller stopped waiting is withdrawn
-- ('deadline_passed'), as dpp_lock_reservation's callers did in Python, and
-- the writes' lock waits (on another transaction's conflicting insert; the
-- tenant, key and API key rows are held) end with the earliest admitted
-- caller's time left. Postgres answers a wait past its bound with
-- lock_not_available, and the whole statement rolls back. dpp_lock_reservation and dpp_write_reservation are
-- unchanged, so a replica of the previous release keeps working beside this
-- one during a rolling deploy.

-- How long ago a caller measured its time left (dpp_reserve): since the
-- statement arrived, or since p_measured_at by this server's clock, whichever
-- is longer. The statement's arrival alone misses what happened between the
-- measure and the send (the driver preparing the statement first, a round
-- trip of its own on a connection's first use); the caller's clock alone
-- trusts two clocks to agree. A server clock ahead of the caller's only
-- withdraws a draft early (nothing is committed late); one behind it is
-- covered by the arrival.
CREATE FUNCTION dpp_waited_ms(p_measured_at DOUBLE PRECISION) RETURNS DOUBLE PRECISION
LANGUAGE sql VOLATILE AS $$
    SELECT greatest(
        extract(epoch FROM clock_timestamp() - statement_timestamp()) * 1000,
        coalesce((extract(epoch FROM clock_timestamp()) - p_measured_at) * 1000, 0));
$$;

CREATE FUNCTION dpp_reserve(
    p_tenant_id TEXT,
    -- one per draft, in the batch's order
    p_run_ids TEXT[], p_pack_types TEXT[], p_inputs JSONB[], p_metadata JSONB[],
    p_reserved BIGINT[], p_minimum BIGINT[], p_timebox INTEGER[], p_trace_ids TEXT[],
    p_created_at TIMESTAMPTZ[], p_api_key_ids TEXT[],
    -- each caller's time left when it was measured, and when that was (the
    -- caller's clock, Unix seconds); NULL: no deadlines
    p_remaining_ms DOUBLE PRECISION[], p_measured_at DOUBLE PRECISION,
    -- one per draft, NULL where the draft has no idempotency key; a NULL
    -- sha256 is a key its request already holds, else the key is claimed
    p_key_methods TEXT[], p_key_paths TEXT[], p_key_keys TEXT[], p_key_owners UUID[],
    p_claim_sha256 BYTEA[], p_claim_lock_s DOUBLE PRECISION[],
    p_key_statuses INTEGER[], p_key_headers JSONB[], p_key_bodies BYTEA[],
    OUT tenant_found BOOLEAN,
    -- one per draft: accepted, insufficient_budget, concurrency_limited,
    -- key_spend_limit, key_not_held, deadline_passed; and what was available
    -- when it was decided (NULL for a withdrawn draft)
    OUT outcomes TEXT[], OUT available BIGINT[],
    -- the locked state the decisions were made on
    OUT locked_balance_usd_micros BIGINT, OUT locked_reserved_usd_micros BIGINT,
    OUT max_concurrent_runs INTEGER, OUT open_runs BIGINT,
    OUT key_methods TEXT[], OUT key_paths TEXT[], OUT key_keys TEXT[],
    OUT key_states TEXT[], OUT key_owners UUID[],
    OUT spend_key_ids TEXT[], OUT spend_limits BIGINT[], OUT spend_spent BIGINT[],
    -- the keys completed, and the tenant's counters after the batch
    OUT completed BIGINT,
    OUT balance_usd_micros BIGINT, OUT reserved_usd_micros BIGINT, OUT ledger_version BIGINT
) LANGUAGE plpgsql VOLATILE
SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off
AS $$
DECLARE
    -- the answer still has to travel back: a draft this close to its caller's
    -- deadline is withdrawn rather than admitted into an answer that would
    -- come too late (and the lock waits end this much earlier)
    deadline_margin_ms CONSTANT DOUBLE PRECISION := 5;
    drafts INTEGER := cardinality(p_run_ids);
    locked RECORD;
    latest_ms DOUBLE PRECISION;
    earliest_ms DOUBLE PRECISION;
    waited_ms DOUBLE PRECISION;
    held UUID;
    reserved_now BIGINT;
    open_now BIGINT;
    left_now BIGINT;
    spent_now BIGINT[];
    spend_at INTEGER;
    admitted INTEGER[] := '{}';
    written RECORD;
BEGIN
    IF cardinality(p_api_key_ids) IS DISTINCT FROM drafts
       OR cardinality(p_key_keys) IS DISTINCT FROM drafts
       OR cardinality(p_key_owners) IS DISTINCT FROM drafts
       OR cardinality(p_claim_sha256) IS DISTINCT FROM drafts
       OR cardinality(p_remaining_ms) IS DISTINCT FROM drafts AND p_remaining_ms IS NOT NULL THEN
        RAISE EXCEPTION 'dpp_reserve: one value per draft' USING ERRCODE = 'P0001';
    END IF;

    -- the lock waits end with the latest caller's patience (a draft whose own
    -- deadline passed meanwhile is withdrawn below)
    SELECT max(remaining) INTO latest_ms FROM unnest(p_remaining_ms) AS remaining;
    IF latest_ms IS NOT NULL THEN
        latest_ms := latest_ms - dpp_waited_ms(p_measured_at);
        PERFORM set_config('lock_timeout',
                           greatest(1, floor(latest_ms - deadline_margin_ms))::BIGINT || 'ms',
                           true);
    END IF;

    SELECT * INTO locked FROM dpp_lock_reservation(
        p_tenant_id,
        p_key_methods, p_key_paths, p_key_keys,
        ARRAY(SELECT DISTINCT api_key_id FROM unnest(p_api_key_ids) AS api_key_id
              WHERE api_key_id IS NOT NULL ORDER BY api_key_id),
        p_remaining_ms,
        p_claim_sha256, p_key_owners, p_claim_lock_s);
    tenant_found := locked.tenant_found;
    IF NOT tenant_found THEN
        RETURN;
    END IF;
    locked_balance_usd_micros := locked.balance_usd_micros;
    locked_reserved_usd_micros := locked.reserved_usd_micros;
    max_concurrent_runs := locked.max_concurrent_runs;
    open_runs := locked.open_runs;
    key_methods := locked.key_methods;
    key_paths := locked.key_paths;
    key_keys := locked.key_keys;
    key_states := locked.key_states;
    key_owners := locked.key_owners;
    spend_key_ids := locked.spend_key_ids;
    spend_limits := locked.spend_limits;
    spend_spent := locked.spend_spent;

    -- decide in order, as dpp.money.rules.decide_batch does
    waited_ms := dpp_waited_ms(p_measured_at);
    outcomes := array_fill(NULL::TEXT, ARRAY[drafts]);
    available := array_fill(NULL::BIGINT, ARRAY[drafts]);
    reserved_now := locked.reserved_usd_micros;
    open_now := locked.open_runs;
    spent_now := coalesce(locked.spend_spent, '{}');
    FOR i IN 1 .. drafts LOOP
        IF p_key_keys[i] IS NOT NULL THEN
            held := NULL;
            SELECT k.owner INTO held
            FROM unnest(locked.key_methods, locked.key_paths, locked.key_keys,
                        locked.key_states, locked.key_owners)
                 AS k(method, path, key, state, owner)
            WHERE k.method = p_key_methods[i] AND k.path = p_key_paths[i]
              AND k.key = p_key_keys[i] AND k.state = 'in_flight';
            IF held IS DISTINCT FROM p_key_owners[i] THEN
                outcomes[i] := 'key_not_held';
                CONTINUE;
            END IF;
        END IF;
        IF p_remaining_ms IS NOT NULL
           AND waited_ms + deadline_margin_ms >= p_remaining_ms[i] THEN
            outcomes[i] := 'deadline_passed';
            CONTINUE;
        END IF;
        spend_at := NULL;
        IF p_api_key_ids[i] IS NOT NULL THEN
            spend_at := array_position(locked.spend_key_ids, p_api_key_ids[i]);
            IF spend_at IS NULL THEN
                RAISE EXCEPTION 'dpp_reserve: a run''s key is not one of its tenant''s keys'
                    USING ERRCODE = 'P0001';
            END IF;
        END IF;
        left_now := locked.balance_usd_micros - reserved_now;
        available[i] := left_now;
        IF open_now >= locked.max_concurrent_runs THEN
            outcomes[i] := 'concurrency_limited';
        ELSIF p_reserved[i] > left_now THEN
            outcomes[i] := 'insufficient_budget';
        ELSIF spend_at IS NOT NULL AND locked.spend_limits[spend_at] IS NOT NULL
              AND spent_now[spend_at] + p_reserved[i] > locked.spend_limits[spend_at] THEN
            outcomes[i] := 'key_spend_limit';
        ELSE
            outcomes[i] := 'accepted';
            admitted := admitted || i;
            reserved_now := reserved_now + p_reserved[i];
            open_now := open_now + 1;
            IF spend_at IS NOT NULL THEN
                spent_now[spend_at] := spent_now[spend_at] + p_reserved[i];
            END IF;
        END IF;
    END LOOP;

    IF cardinality(admitted) = 0 THEN
        completed := 0;
        balance_usd_micros := locked.balance_usd_micros;
        reserved_usd_micros := locked.reserved_usd_micros;
        ledger_version := locked.ledger_version;
        RETURN;
    END IF;

    -- the writes wait on no lock the batch holds, but may on another
    -- transaction's (a conflicting insert): those waits end with the earliest
    -- admitted caller's time left, as the statements after the locks did
    IF p_remaining_ms IS NOT NULL THEN
        SELECT min(p_remaining_ms[i]) INTO earliest_ms FROM unnest(admitted) AS a(i);
        waited_ms := dpp_waited_ms(p_measured_at);
        PERFORM set_config('lock_timeout',
                           greatest(1, floor(earliest_ms - waited_ms - deadline_margin_ms))::BIGINT
                           || 'ms', true);
    END IF;

    -- the admitted drafts' runs and their keys' completions
    SELECT * INTO written FROM dpp_write_reservation(
        p_tenant_id,
        ARRAY(SELECT p_run_ids[i] FROM unnest(admitted) WITH ORDINALITY AS a(i, o) ORDER BY o),
        ARRAY(SELECT p_pack_types[i] FROM unnest(admitted) WITH ORDINALITY AS a(i, o) ORDER BY o),
        ARRAY(SELECT p_inputs[i] FROM unnest(admitted) WITH ORDINALITY AS a(i, o) ORDER BY o),
        ARRAY(SELECT p_metadata[i] FROM unnest(admitted) WITH ORDINALITY AS a(i, o) ORDER BY o),
        ARRAY(SELECT p_reserved[i] FROM unnest(admitted) WITH ORDINALITY AS a(i, o) ORDER BY o),
        ARRAY(SELECT p_minimum[i] FROM unnest(admitted) WITH ORDINALITY AS a(i, o) ORDER BY o),
        ARRAY(SELECT p_timebox[i] FROM unnest(admitted) WITH ORDINALITY AS a(i, o) ORDER BY o),
        ARRAY(SELECT p_trace_ids[i] FROM unnest(admitted) WITH ORDINALITY AS a(i, o) ORDER BY o),
        ARRAY(SELECT p_created_at[i] FROM unnest(admitted) WITH ORDINALITY AS a(i, o) ORDER BY o),
        ARRAY(SELECT p_api_key_ids[i] FROM unnest(admitted) WITH ORDINALITY AS a(i, o) ORDER BY o),
        ARRAY(SELECT p_key_methods[i] FROM unnest(admitted) WITH ORDINALITY AS a(i, o)
              WHERE p_key_keys[i] IS NOT NULL ORDER BY o),
        ARRAY(SELECT p_key_paths[i] FROM unnest(admitted) WITH ORDINALITY AS a(i, o)
              WHERE p_key_keys[i] IS NOT NULL ORDER BY o),
        ARRAY(SELECT p_key_keys[i] FROM unnest(admitted) WITH ORDINALITY AS a(i, o)
              WHERE p_key_keys[i] IS NOT NULL ORDER BY o),
        ARRAY(SELECT p_key_statuses[i] FROM unnest(admitted) WITH ORDINALITY AS a(i, o)
              WHERE p_key_keys[i] IS NOT NULL ORDER BY o),
        ARRAY(SELECT p_key_headers[i] FROM unnest(admitted) WITH ORDINALITY AS a(i, o)
              WHERE p_key_keys[i] IS NOT NULL ORDER BY o),
        ARRAY(SELECT p_key_bodies[i] FROM unnest(admitted) WITH ORDINALITY AS a(i, o)
              WHERE p_key_keys[i] IS NOT NULL ORDER BY o));
    completed := written.completed;
    balance_usd_micros := written.balance_usd_micros;
    reserved_usd_micros := written.reserved_usd_micros;
    ledger_version := written.ledger_version;
END
$$;
