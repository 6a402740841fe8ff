-- The database enforces SPEC §1's invariants 1-4 itself: no statement, the
-- application's or a hand-typed one, can leave a state that breaks them.
--
--   1. balance == credits - charges   } the tenant counters are written only
--   2. reserved == sum(R) of open runs } by the ledger's insert trigger, from
--                                        the entries it inserts; a direct
--                                        UPDATE of a counter is refused
--   3. available >= 0                 the tenants_available_nonnegative CHECK
--   4. one settlement, charged + refunded == R, per terminal run:
--      runs move only along SPEC §2's table with the charge each transition
--      allows; a terminal run never changes again; a run's insert writes its
--      reserve entry of R; every settlement writes its charge and refund
--      entries in the same transaction (a deferred constraint trigger checks
--      it at commit); a ledger entry must match its run.
--
-- TRUNCATE of a money table is refused. What is left outside: a superuser
-- (DDL, `ALTER TABLE ... DISABLE TRIGGER`, `session_replication_role =
-- replica`); the application's role must not be one (docs/operations.md).

-- A rule's refusal: SQLSTATE 23000 (integrity_constraint_violation), message
-- "dpp rule <name>: <what>".

CREATE FUNCTION dpp_refuse_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'dpp rule no_truncate: TRUNCATE % would lose money records', TG_TABLE_NAME
        USING ERRCODE = 'integrity_constraint_violation';
END;
$$;

CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION dpp_refuse_truncate();
CREATE TRIGGER runs_no_truncate BEFORE TRUNCATE ON runs
    FOR EACH STATEMENT EXECUTE FUNCTION dpp_refuse_truncate();
CREATE TRIGGER tenants_no_truncate BEFORE TRUNCATE ON tenants
    FOR EACH STATEMENT EXECUTE FUNCTION dpp_refuse_truncate();

-- Invariants 1 and 2, tenant side: the counters move only from inside the
-- ledger trigger below (trigger depth 2: the ledger's AFTER trigger updates
-- tenants, which fires this one). A client statement runs this at depth 1.
CREATE FUNCTION tenants_counters_from_ledger_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF pg_trigger_depth() < 2 THEN
        RAISE EXCEPTION 'dpp rule counters_from_ledger: tenant % balance, reserved and '
            'ledger_version change only through ledger entries', NEW.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER tenants_counters_start_at_zero
    BEFORE INSERT ON tenants
    FOR EACH ROW
    WHEN (NEW.balance_usd_micros <> 0 OR NEW.reserved_usd_micros <> 0 OR NEW.ledger_version <> 0)
    EXECUTE FUNCTION tenants_counters_from_ledger_only();

CREATE TRIGGER tenants_counters_move_with_ledger
    BEFORE UPDATE ON tenants
    FOR EACH ROW
    WHEN (OLD.balance_usd_micros IS DISTINCT FROM NEW.balance_usd_micros
          OR OLD.reserved_usd_micros IS DISTINCT FROM NEW.reserved_usd_micros
          OR OLD.ledger_version IS DISTINCT FROM NEW.ledger_version)
    EXECUTE FUNCTION tenants_counters_from_ledger_only();

-- Every ledger INSERT statement: check each entry against its run, then move
-- the counters of each tenant it touches once (one UPDATE per statement, so a
-- batch of 64 reservations costs one counter write, as before). The CHECK on
-- tenants (available >= 0) judges that UPDATE: an overspend aborts the batch.
--   reserve: on a QUEUED run of the same tenant, amount == the run's R (the
--            run's insert writes it; the unique (run_id, kind) index refuses
--            any other);
--   charge / refund: on a terminal run of the same tenant, amount == the
--            run's charged / refunded (so charge <= R), and only for a run
--            whose reserve entry exists.
CREATE FUNCTION ledger_entries_apply() RETURNS trigger
LANGUAGE plpgsql AS $$
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
        OR (e.kind IN ('charge', 'refund') AND NOT EXISTS (
            SELECT 1 FROM ledger_entries h WHERE h.run_id = e.run_id AND h.kind = 'reserve'))
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
    RETURN NULL;
END;
$$;

CREATE TRIGGER ledger_entries_move_counters
    AFTER INSERT ON ledger_entries
    REFERENCING NEW TABLE AS inserted_entries
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_entries_apply();

-- A run is born QUEUED, and its insert writes its reserve entry of R: the
-- run's own statement-level trigger inserts the entries (one INSERT per
-- batch), so a run without its reservation cannot exist, and the ledger
-- trigger above moves the tenant's reserved (the CHECK judging the batch).
CREATE FUNCTION runs_born_queued() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'dpp rule run_born_queued: run % is created %, not QUEUED', NEW.id, NEW.status
        USING ERRCODE = 'integrity_constraint_violation';
END;
$$;

CREATE TRIGGER runs_born_queued
    BEFORE INSERT ON runs
    FOR EACH ROW WHEN (NEW.status <> 'QUEUED')
    EXECUTE FUNCTION runs_born_queued();

CREATE FUNCTION runs_reserve_in_ledger() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ledger_entries (tenant_id, run_id, kind, amount_usd_micros, operation_id)
    SELECT tenant_id, id, 'reserve', reserved_usd_micros, 'reserve:' || id
    FROM created_runs;
    RETURN NULL;
END;
$$;

CREATE TRIGGER runs_reserve_in_ledger
    AFTER INSERT ON runs
    REFERENCING NEW TABLE AS created_runs
    FOR EACH STATEMENT EXECUTE FUNCTION runs_reserve_in_ledger();

-- SPEC §2's table, and nothing else. A terminal run never changes its status,
-- tenant, money or finished_at; no run changes its tenant, R or M. The charge
-- each transition into a terminal state allows:
--   QUEUED -> CANCELED                               0
--   PROCESSING -> FAILED | EXPIRED, CLAIMED -> FAILED M
--   CLAIMED -> COMPLETED                             M <= charged <= R
--   AUDIT_REQUIRED -> COMPLETED | FAILED (operator)  0 <= charged <= R
-- (charged + refunded == R and refunded >= 0 are the table's CHECK.)
CREATE FUNCTION runs_transition_allowed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    move TEXT := OLD.status || '>' || NEW.status;
    allowed BOOLEAN;
BEGIN
    IF OLD.status IN ('COMPLETED', 'FAILED', 'EXPIRED', 'CANCELED') THEN
        RAISE EXCEPTION 'dpp rule terminal_is_final: run % is % and settled; it never changes '
            'again (attempted %)', OLD.id, OLD.status, move
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF NEW.tenant_id <> OLD.tenant_id
        OR NEW.reserved_usd_micros <> OLD.reserved_usd_micros
        OR NEW.minimum_fee_usd_micros <> OLD.minimum_fee_usd_micros THEN
        RAISE EXCEPTION 'dpp rule run_terms_fixed: run % keeps its tenant, R and M', OLD.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF NEW.status = OLD.status THEN
        RETURN NEW;  -- an open run: the table's CHECK keeps charged/refunded NULL
    END IF;
    allowed := CASE move
        WHEN 'QUEUED>PROCESSING' THEN TRUE
        WHEN 'PROCESSING>CLAIMED' THEN TRUE
        WHEN 'PROCESSING>QUEUED' THEN TRUE
        WHEN 'QUEUED>AUDIT_REQUIRED' THEN TRUE
        WHEN 'PROCESSING>AUDIT_REQUIRED' THEN TRUE
        WHEN 'CLAIMED>AUDIT_REQUIRED' THEN TRUE
        WHEN 'QUEUED>CANCELED' THEN NEW.charged_usd_micros = 0
        WHEN 'PROCESSING>FAILED' THEN NEW.charged_usd_micros = NEW.minimum_fee_usd_micros
        WHEN 'PROCESSING>EXPIRED' THEN NEW.charged_usd_micros = NEW.minimum_fee_usd_micros
        WHEN 'CLAIMED>FAILED' THEN NEW.charged_usd_micros = NEW.minimum_fee_usd_micros
        WHEN 'CLAIMED>COMPLETED' THEN NEW.charged_usd_micros
            BETWEEN NEW.minimum_fee_usd_micros AND NEW.reserved_usd_micros
        WHEN 'AUDIT_REQUIRED>COMPLETED' THEN NEW.charged_usd_micros
            BETWEEN 0 AND NEW.reserved_usd_micros
        WHEN 'AUDIT_REQUIRED>FAILED' THEN NEW.charged_usd_micros
            BETWEEN 0 AND NEW.reserved_usd_micros
        ELSE FALSE
    END;
    IF allowed IS NOT TRUE THEN
        RAISE EXCEPTION 'dpp rule transition: run % may not go % charging % (R %, M %)',
            OLD.id, move, coalesce(NEW.charged_usd_micros::text, 'nothing'),
            NEW.reserved_usd_micros, NEW.minimum_fee_usd_micros
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER runs_transition_allowed
    BEFORE UPDATE ON runs
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
          OR OLD.tenant_id IS DISTINCT FROM NEW.tenant_id
          OR OLD.reserved_usd_micros IS DISTINCT FROM NEW.reserved_usd_micros
          OR OLD.minimum_fee_usd_micros IS DISTINCT FROM NEW.minimum_fee_usd_micros
          OR OLD.charged_usd_micros IS DISTINCT FROM NEW.charged_usd_micros
          OR OLD.refunded_usd_micros IS DISTINCT FROM NEW.refunded_usd_micros
          OR OLD.finished_at IS DISTINCT FROM NEW.finished_at)
    EXECUTE FUNCTION runs_transition_allowed();

-- A run that became terminal carries its charge and refund entries, equal to
-- its columns, by the end of the transaction that settled it.
CREATE FUNCTION runs_settled_in_ledger() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    charged BIGINT;
    refunded BIGINT;
BEGIN
    SELECT sum(amount_usd_micros) FILTER (WHERE kind = 'charge'),
           sum(amount_usd_micros) FILTER (WHERE kind = 'refund')
    INTO charged, refunded
    FROM ledger_entries
    WHERE run_id = NEW.id AND kind IN ('charge', 'refund');
    IF charged IS DISTINCT FROM NEW.charged_usd_micros
        OR refunded IS DISTINCT FROM NEW.refunded_usd_micros THEN
        RAISE EXCEPTION 'dpp rule run_settled: run % is % without its charge and refund '
            'entries (% and %)', NEW.id, NEW.status, NEW.charged_usd_micros,
            NEW.refunded_usd_micros
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NULL;
END;
$$;

CREATE CONSTRAINT TRIGGER runs_settled_in_ledger
    AFTER UPDATE ON runs
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (NEW.status IN ('COMPLETED', 'FAILED', 'EXPIRED', 'CANCELED')
          AND OLD.status NOT IN ('COMPLETED', 'FAILED', 'EXPIRED', 'CANCELED'))
    EXECUTE FUNCTION runs_settled_in_ledger();
