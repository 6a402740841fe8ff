-- A settlement batch in one statement (issue 11).
--
-- A settlement batch was four round trips on one connection: BEGIN,
-- dpp_lock_runs (0009), the decision in Python (dpp.money.ledger's
-- _decide_settlement), dpp_write_settlements (0007), COMMIT. The ledger
-- trigger locks each tenant's row inside dpp_write_settlements, so that row
-- stayed locked through the reply to it and the COMMIT that followed: a round
-- trip of the settling replica's event loop, during which the tenant's next
-- reservation (dpp_reserve, which locks the same row first) waited. Measured
-- with echo runs on a loaded two-core machine: the settlement's four calls
-- took ~10 ms per batch at the median, the reservation beside it ~8 ms.
--
-- dpp_settle locks the runs by calling dpp_lock_runs, decides each request by
-- the rule of _decide_settlement, and writes the settled ones by calling
-- dpp_write_settlements, all in one statement: one round trip, and a
-- transaction of its own (the caller sends it outside BEGIN; its commit ends
-- the statement), so the tenant rows are held from the ledger insert to the
-- commit and no longer.
--
-- As with dpp_reserve (0010), the decision made here is checked, not trusted:
-- the function returns the locked state of every request's run (status,
-- version, lease token, R, M, what a terminal run was charged and refunded,
-- whether an AUDIT_REQUIRED run holds a reserve entry) and dpp/money/ledger.py
-- decides the batch again with _decide_settlement and asserts both agree.
-- Every guard below it stands as it was: the row locks in id order, the
-- version-guarded UPDATE (the caller checks its count), the transition rules
-- of 0004 (runs_transition_allowed: what each move may charge), the ledger's
-- entry-matches-run check and unique operation ids, runs_settled_in_ledger,
-- and the CHECKs on runs and tenants. dpp_lock_runs and dpp_write_settlements
-- are unchanged, so a replica of the previous release keeps working beside
-- this one during a rolling deploy.
--
-- A request is decided in the batch's order. Its verdict: 'settled' (written
-- now), 'replayed' (the run is terminal with this outcome already, or an
-- earlier request of this batch settled it so: nothing moves), 'refused'
-- (reasons as _decide_settlement words them) or 'not_found'.
CREATE FUNCTION dpp_settle(
    -- one per request, in the batch's order
    p_run_ids TEXT[], p_outcomes TEXT[], p_actual_costs BIGINT[],
    -- the statuses each request may move its run from, comma-separated
    p_from_statuses TEXT[],
    -- the guards a request brings, NULL where it brings none
    p_lease_tokens TEXT[], p_expected_versions BIGINT[],
    -- an operator's resolution of AUDIT_REQUIRED: charge exactly this
    p_charged_overrides BIGINT[],
    p_errors JSONB[], p_result_keys TEXT[], p_result_sha256 TEXT[], p_result_bytes BIGINT[],
    p_result_content_types TEXT[],
    -- one per request: the verdict, why (refused), what the run is charged and refunded
    OUT verdicts TEXT[], OUT reasons TEXT[], OUT charged BIGINT[], OUT refunded BIGINT[],
    -- one per request: its run as locked (NULL where there is none)
    OUT run_tenant_ids TEXT[], OUT run_statuses TEXT[], OUT run_versions BIGINT[],
    OUT run_lease_tokens TEXT[], OUT run_reserved BIGINT[], OUT run_minimum BIGINT[],
    OUT run_charged BIGINT[], OUT run_refunded BIGINT[], OUT run_has_reserve BOOLEAN[],
    -- what dpp_write_settlements answered: the runs settled and when, and the
    -- counters of each tenant whose entries were written
    OUT settled_ids TEXT[], OUT finished_at TIMESTAMPTZ[],
    OUT tenant_ids TEXT[], OUT balances_usd_micros BIGINT[], OUT reserved_usd_micros BIGINT[],
    OUT ledger_versions BIGINT[]
) LANGUAGE plpgsql VOLATILE
SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off
AS $$
DECLARE
    requests INTEGER := cardinality(p_run_ids);
    locked RECORD;
    retention INTEGER[];
    at INTEGER;
    earlier INTEGER;
    status TEXT;
    charge BIGINT;
    -- the writes, one per settled request
    w_index INTEGER[] := '{}';
BEGIN
    IF requests IS NULL OR requests = 0
       OR cardinality(p_outcomes) IS DISTINCT FROM requests
       OR cardinality(p_actual_costs) IS DISTINCT FROM requests
       OR cardinality(p_from_statuses) IS DISTINCT FROM requests
       OR cardinality(p_lease_tokens) IS DISTINCT FROM requests
       OR cardinality(p_expected_versions) IS DISTINCT FROM requests
       OR cardinality(p_charged_overrides) IS DISTINCT FROM requests
       OR cardinality(p_errors) IS DISTINCT FROM requests
       OR cardinality(p_result_keys) IS DISTINCT FROM requests
       OR cardinality(p_result_sha256) IS DISTINCT FROM requests
       OR cardinality(p_result_bytes) IS DISTINCT FROM requests
       OR cardinality(p_result_content_types) IS DISTINCT FROM requests THEN
        RAISE EXCEPTION 'dpp_settle: one value per request' USING ERRCODE = 'P0001';
    END IF;

    verdicts := array_fill(NULL::TEXT, ARRAY[requests]);
    reasons := array_fill(NULL::TEXT, ARRAY[requests]);
    charged := array_fill(NULL::BIGINT, ARRAY[requests]);
    refunded := array_fill(NULL::BIGINT, ARRAY[requests]);
    run_tenant_ids := array_fill(NULL::TEXT, ARRAY[requests]);
    run_statuses := array_fill(NULL::TEXT, ARRAY[requests]);
    run_versions := array_fill(NULL::BIGINT, ARRAY[requests]);
    run_lease_tokens := array_fill(NULL::TEXT, ARRAY[requests]);
    run_reserved := array_fill(NULL::BIGINT, ARRAY[requests]);
    run_minimum := array_fill(NULL::BIGINT, ARRAY[requests]);
    run_charged := array_fill(NULL::BIGINT, ARRAY[requests]);
    run_refunded := array_fill(NULL::BIGINT, ARRAY[requests]);
    run_has_reserve := array_fill(NULL::BOOLEAN, ARRAY[requests]);
    retention := array_fill(NULL::INTEGER, ARRAY[requests]);

    -- the runs, locked in id order (dpp_lock_runs), each copied to every
    -- request that names it
    FOR locked IN SELECT * FROM dpp_lock_runs(p_run_ids) LOOP
        FOREACH at IN ARRAY array_positions(p_run_ids, locked.id) LOOP
            run_tenant_ids[at] := locked.tenant_id;
            run_statuses[at] := locked.status;
            run_versions[at] := locked.version;
            run_lease_tokens[at] := locked.lease_token::TEXT;
            run_reserved[at] := locked.reserved_usd_micros;
            run_minimum[at] := locked.minimum_fee_usd_micros;
            run_charged[at] := locked.charged_usd_micros;
            run_refunded[at] := locked.refunded_usd_micros;
            run_has_reserve[at] := locked.status = 'AUDIT_REQUIRED' AND EXISTS (
                SELECT 1 FROM ledger_entries e
                WHERE e.run_id = locked.id AND e.kind = 'reserve');
            retention[at] := locked.retention_days;
        END LOOP;
    END LOOP;

    -- decide in order, as dpp.money.ledger._decide_settlement does
    FOR i IN 1 .. requests LOOP
        -- an earlier request of this batch settled the run: a replay of the
        -- same outcome, else refused (the run is as good as terminal)
        earlier := NULL;
        FOREACH at IN ARRAY array_positions(p_run_ids, p_run_ids[i]) LOOP
            IF at < i AND verdicts[at] = 'settled' THEN
                earlier := at;
            END IF;
        END LOOP;
        IF earlier IS NOT NULL THEN
            IF p_outcomes[earlier] = p_outcomes[i] THEN
                verdicts[i] := 'replayed';
                charged[i] := charged[earlier];
                refunded[i] := refunded[earlier];
            ELSE
                verdicts[i] := 'refused';
                reasons[i] := 'already settled';
            END IF;
            CONTINUE;
        END IF;

        status := run_statuses[i];
        IF status IS NULL THEN
            verdicts[i] := 'not_found';
            CONTINUE;
        END IF;
        IF status IN ('COMPLETED', 'FAILED', 'EXPIRED', 'CANCELED') THEN
            IF status = p_outcomes[i] THEN
                verdicts[i] := 'replayed';
                charged[i] := run_charged[i];
                refunded[i] := run_refunded[i];
            ELSE
                verdicts[i] := 'refused';
                reasons[i] := 'already settled';
            END IF;
            CONTINUE;
        END IF;
        verdicts[i] := 'refused';
        IF NOT status = ANY (string_to_array(p_from_statuses[i], ',')) THEN
            reasons[i] := 'not settleable from this state';
            CONTINUE;
        END IF;
        IF p_lease_tokens[i] IS NOT NULL
           AND run_lease_tokens[i] IS DISTINCT FROM p_lease_tokens[i] THEN
            reasons[i] := 'lease token is stale';
            CONTINUE;
        END IF;
        IF p_expected_versions[i] IS NOT NULL AND run_versions[i] <> p_expected_versions[i] THEN
            reasons[i] := 'run changed since it was observed';
            CONTINUE;
        END IF;
        IF status = 'AUDIT_REQUIRED' AND NOT run_has_reserve[i] THEN
            -- nothing is held for it: settling would release money never reserved
            reasons[i] := 'the ledger holds no reservation for it';
            CONTINUE;
        END IF;

        -- SPEC §1's table (dpp.money.rules.settle), or the operator's charge
        IF p_charged_overrides[i] IS NOT NULL THEN
            charge := p_charged_overrides[i];
        ELSE
            charge := CASE p_outcomes[i]
                WHEN 'COMPLETED' THEN
                    least(greatest(p_actual_costs[i], run_minimum[i]), run_reserved[i])
                WHEN 'FAILED' THEN run_minimum[i]
                WHEN 'EXPIRED' THEN run_minimum[i]
                WHEN 'CANCELED' THEN 0
            END;
        END IF;
        IF charge IS NULL OR charge < 0 OR charge > run_reserved[i]
           OR (p_outcomes[i] = 'COMPLETED' AND p_charged_overrides[i] IS NULL
               AND (p_actual_costs[i] IS NULL OR p_actual_costs[i] < 0)) THEN
            RAISE EXCEPTION 'dpp_settle: run % cannot be charged % for %', p_run_ids[i],
                coalesce(charge::TEXT, 'nothing'), p_outcomes[i] USING ERRCODE = 'P0001';
        END IF;
        verdicts[i] := 'settled';
        reasons[i] := NULL;
        charged[i] := charge;
        refunded[i] := run_reserved[i] - charge;
        w_index := w_index || i;
    END LOOP;

    IF cardinality(w_index) = 0 THEN
        RETURN;
    END IF;

    -- the settled runs (guarded by the versions read under their locks), their
    -- charge and refund entries, and the counters the ledger trigger wrote
    SELECT w.settled_ids, w.finished_at, w.tenant_ids, w.balances_usd_micros,
           w.reserved_usd_micros, w.ledger_versions
    INTO settled_ids, finished_at, tenant_ids, balances_usd_micros, reserved_usd_micros,
         ledger_versions
    FROM dpp_write_settlements(
        ARRAY(SELECT p_run_ids[i] FROM unnest(w_index) WITH ORDINALITY AS w(i, o) ORDER BY o),
        ARRAY(SELECT p_outcomes[i] FROM unnest(w_index) WITH ORDINALITY AS w(i, o) ORDER BY o),
        ARRAY(SELECT charged[i] FROM unnest(w_index) WITH ORDINALITY AS w(i, o) ORDER BY o),
        ARRAY(SELECT refunded[i] FROM unnest(w_index) WITH ORDINALITY AS w(i, o) ORDER BY o),
        ARRAY(SELECT retention[i] FROM unnest(w_index) WITH ORDINALITY AS w(i, o) ORDER BY o),
        ARRAY(SELECT p_errors[i] FROM unnest(w_index) WITH ORDINALITY AS w(i, o) ORDER BY o),
        ARRAY(SELECT p_result_keys[i] FROM unnest(w_index) WITH ORDINALITY AS w(i, o) ORDER BY o),
        ARRAY(SELECT p_result_sha256[i] FROM unnest(w_index) WITH ORDINALITY AS w(i, o)
              ORDER BY o),
        ARRAY(SELECT p_result_bytes[i] FROM unnest(w_index) WITH ORDINALITY AS w(i, o)
              ORDER BY o),
        ARRAY(SELECT p_result_content_types[i] FROM unnest(w_index) WITH ORDINALITY AS w(i, o)
              ORDER BY o),
        ARRAY(SELECT run_versions[i] FROM unnest(w_index) WITH ORDINALITY AS w(i, o) ORDER BY o),
        -- a charge and a refund entry per settled run
        ARRAY(SELECT run_tenant_ids[i] FROM unnest(w_index) WITH ORDINALITY AS w(i, o)
              CROSS JOIN (VALUES (1), (2)) AS k(n) ORDER BY o, n),
        ARRAY(SELECT p_run_ids[i] FROM unnest(w_index) WITH ORDINALITY AS w(i, o)
              CROSS JOIN (VALUES (1), (2)) AS k(n) ORDER BY o, n),
        ARRAY(SELECT CASE k.n WHEN 1 THEN 'charge' ELSE 'refund' END
              FROM unnest(w_index) WITH ORDINALITY AS w(i, o)
              CROSS JOIN (VALUES (1), (2)) AS k(n) ORDER BY o, n),
        ARRAY(SELECT CASE k.n WHEN 1 THEN charged[i] ELSE refunded[i] END
              FROM unnest(w_index) WITH ORDINALITY AS w(i, o)
              CROSS JOIN (VALUES (1), (2)) AS k(n) ORDER BY o, n)) AS w;
END
$$;
