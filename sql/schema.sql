-- DPP: the full schema, as sql/migrations/*.sql produce it, kept by hand.
--
-- Read this file to see the whole database at once; the migrations are the
-- history, this is the result. When you add a migration, change this file to
-- match: tests/integration/test_migrate.py builds one database from each and
-- fails on any difference (`dpp.migrate.compare_schemas`). Data rows here
-- (the `default` plan) mirror the migrations' seed rows; the comparison only
-- covers schema. `dpp migrate` never reads this file, and the runner's own
-- `schema_migrations` table is not part of it.

CREATE TABLE plans (
    id                   TEXT PRIMARY KEY CHECK (id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    requests_per_minute  INTEGER NOT NULL CHECK (requests_per_minute BETWEEN 1 AND 1000000),
    max_concurrent_runs  INTEGER NOT NULL CHECK (max_concurrent_runs BETWEEN 1 AND 100000),
    retention_days       INTEGER NOT NULL CHECK (retention_days BETWEEN 1 AND 3650),
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at           TIMESTAMPTZ NOT NULL DEFAULT now()
);

INSERT INTO plans (id, requests_per_minute, max_concurrent_runs, retention_days)
VALUES ('default', 600, 10, 30);

-- balance = credits - charges; reserved = open reservations.
-- available = balance - reserved never goes below zero: the CHECK refuses
-- any write that would, whatever the caller (Redis fast path included) said.
CREATE TABLE tenants (
    id                   TEXT PRIMARY KEY CHECK (id ~ '^ten_[0-9a-zA-Z]{20,40}$'),
    name                 TEXT NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    plan_id              TEXT NOT NULL REFERENCES plans (id),
    balance_usd_micros   BIGINT NOT NULL DEFAULT 0,
    reserved_usd_micros  BIGINT NOT NULL DEFAULT 0 CHECK (reserved_usd_micros >= 0),
    -- bumped by every money transaction; lets drift repair tell a quiet tenant
    ledger_version       BIGINT NOT NULL DEFAULT 0,
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT tenants_available_nonnegative
        CHECK (balance_usd_micros - reserved_usd_micros >= 0),
    -- (0012) runs QUEUED, PROCESSING or CLAIMED: the concurrency limit's count,
    -- moved only by the runs' statement triggers (runs_count_open)
    open_runs            INTEGER NOT NULL DEFAULT 0
        CONSTRAINT tenants_open_runs_nonnegative CHECK (open_runs >= 0)
);

CREATE TABLE api_keys (
    id                   TEXT PRIMARY KEY CHECK (id ~ '^key_[0-9a-zA-Z]{20,40}$'),
    tenant_id            TEXT NOT NULL REFERENCES tenants (id),
    name                 TEXT NOT NULL DEFAULT '' CHECK (char_length(name) <= 200),
    key_sha256           BYTEA NOT NULL UNIQUE CHECK (octet_length(key_sha256) = 32),
    -- last 4 characters of the key body, for operators telling keys apart
    key_hint             TEXT NOT NULL CHECK (char_length(key_hint) = 4),
    requests_per_minute  INTEGER CHECK (requests_per_minute BETWEEN 1 AND 1000000),
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_used_at         TIMESTAMPTZ,
    revoked_at           TIMESTAMPTZ,
    -- SPEC §7: NULL is no limit beyond the tenant's budget
    spend_limit_usd_micros BIGINT
        CHECK (spend_limit_usd_micros BETWEEN 1 AND 10000000000000),
    -- R of the key's open runs + charged of its settled runs (ledger trigger only)
    spent_usd_micros     BIGINT NOT NULL DEFAULT 0 CHECK (spent_usd_micros >= 0),
    -- spent when the limit was last set (a trigger writes it): the audit's evidence
    spent_when_limit_set_usd_micros BIGINT NOT NULL DEFAULT 0,
    CONSTRAINT api_keys_id_tenant UNIQUE (id, tenant_id)
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);

CREATE TABLE runs (
    id                        TEXT PRIMARY KEY CHECK (id ~ '^run_[0-9a-zA-Z]{20,40}$'),
    tenant_id                 TEXT NOT NULL REFERENCES tenants (id),
    pack_type                 TEXT NOT NULL CHECK (char_length(pack_type) BETWEEN 1 AND 64),
    status                    TEXT NOT NULL CHECK (status IN (
                                  'QUEUED', 'PROCESSING', 'CLAIMED', 'COMPLETED',
                                  'FAILED', 'EXPIRED', 'CANCELED', 'AUDIT_REQUIRED')),
    inputs                    JSONB NOT NULL,
    metadata                  JSONB NOT NULL DEFAULT '{}'::jsonb,
    reserved_usd_micros       BIGINT NOT NULL CHECK (reserved_usd_micros > 0),
    minimum_fee_usd_micros    BIGINT NOT NULL CHECK (minimum_fee_usd_micros >= 0),
    charged_usd_micros        BIGINT,
    refunded_usd_micros       BIGINT,
    timebox_sec               INTEGER NOT NULL CHECK (timebox_sec BETWEEN 1 AND 3600),
    trace_id                  TEXT CHECK (trace_id ~ '^[0-9a-f]{32}$'),
    version                   BIGINT NOT NULL DEFAULT 0,
    attempts                  INTEGER NOT NULL DEFAULT 0,
    lease_token               UUID,
    lease_expires_at          TIMESTAMPTZ,
    created_at                TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at                TIMESTAMPTZ,
    claimed_at                TIMESTAMPTZ,
    finished_at               TIMESTAMPTZ,
    retention_until           TIMESTAMPTZ,
    result_key                TEXT,
    result_sha256             TEXT CHECK (result_sha256 ~ '^[0-9a-f]{64}$'),
    result_bytes              BIGINT CHECK (result_bytes >= 0),
    result_content_type       TEXT,
    result_deleted_at         TIMESTAMPTZ,
    error                     JSONB,
    -- set once the run's SQS message is sent (the SQS backend only); NULL on a
    -- QUEUED run means "send it again" to the reconciler's backstop
    enqueued_at               TIMESTAMPTZ,
    -- the key the run was submitted with (SPEC §7); fixed for the run's life
    api_key_id                TEXT,
    CONSTRAINT runs_minimum_fee_within_reservation
        CHECK (minimum_fee_usd_micros <= reserved_usd_micros),
    -- a run is settled exactly when it is terminal, and then charged + refunded == R
    CONSTRAINT runs_settlement_matches_status CHECK (
        (status IN ('COMPLETED', 'FAILED', 'EXPIRED', 'CANCELED')
            AND charged_usd_micros IS NOT NULL AND refunded_usd_micros IS NOT NULL
            AND charged_usd_micros >= 0 AND refunded_usd_micros >= 0
            AND charged_usd_micros + refunded_usd_micros = reserved_usd_micros
            AND finished_at IS NOT NULL AND retention_until IS NOT NULL)
        OR
        (status IN ('QUEUED', 'PROCESSING', 'CLAIMED', 'AUDIT_REQUIRED')
            AND charged_usd_micros IS NULL AND refunded_usd_micros IS NULL)
    ),
    CONSTRAINT runs_canceled_charges_nothing
        CHECK (status <> 'CANCELED' OR charged_usd_micros = 0),
    CONSTRAINT runs_lease_only_while_working CHECK (
        (status IN ('PROCESSING', 'CLAIMED')) = (lease_token IS NOT NULL)
    ),
    CONSTRAINT runs_api_key_of_tenant
        FOREIGN KEY (api_key_id, tenant_id) REFERENCES api_keys (id, tenant_id)
);
CREATE INDEX runs_tenant_created ON runs (tenant_id, created_at DESC, id DESC);
CREATE INDEX runs_queued ON runs (created_at, id) WHERE status = 'QUEUED';
CREATE INDEX runs_queued_unsent ON runs (created_at)
    WHERE status = 'QUEUED' AND enqueued_at IS NULL;
CREATE INDEX runs_working_lease ON runs (lease_expires_at) WHERE status = 'PROCESSING';
CREATE INDEX runs_claimed ON runs (claimed_at) WHERE status = 'CLAIMED';
CREATE INDEX runs_audit_required ON runs (created_at) WHERE status = 'AUDIT_REQUIRED';
CREATE INDEX runs_retention ON runs (retention_until)
    WHERE result_key IS NOT NULL AND result_deleted_at IS NULL;
CREATE INDEX runs_api_key ON runs (api_key_id) WHERE api_key_id IS NOT NULL;

-- Append-only money ledger. operation_id is the idempotency id of the
-- movement: replaying an operation hits the UNIQUE and moves nothing.
CREATE TABLE ledger_entries (
    id                   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id            TEXT NOT NULL REFERENCES tenants (id),
    run_id               TEXT REFERENCES runs (id),
    kind                 TEXT NOT NULL CHECK (kind IN ('credit', 'reserve', 'charge', 'refund')),
    amount_usd_micros    BIGINT NOT NULL,
    operation_id         TEXT NOT NULL UNIQUE CHECK (char_length(operation_id) BETWEEN 1 AND 400),
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT ledger_amount_sign CHECK (
        (kind IN ('credit', 'reserve') AND amount_usd_micros > 0)
        OR (kind IN ('charge', 'refund') AND amount_usd_micros >= 0)
    ),
    CONSTRAINT ledger_run_entries_have_run CHECK ((kind = 'credit') = (run_id IS NULL))
);
CREATE INDEX ledger_tenant ON ledger_entries (tenant_id, kind);
CREATE UNIQUE INDEX ledger_one_entry_per_run_kind ON ledger_entries (run_id, kind)
    WHERE run_id IS NOT NULL;

CREATE FUNCTION ledger_entries_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger_entries is append-only';
END;
$$;

CREATE TRIGGER ledger_entries_no_update_or_delete
    BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only();

-- Idempotency records (SPEC §3, §6). The primary key is what makes two
-- concurrent requests with one key impossible to both proceed.
CREATE TABLE idempotency_keys (
    tenant_id            TEXT NOT NULL,
    method               TEXT NOT NULL,
    path                 TEXT NOT NULL,
    key                  TEXT NOT NULL CHECK (char_length(key) BETWEEN 1 AND 255),
    request_sha256       BYTEA NOT NULL,
    state                TEXT NOT NULL CHECK (state IN ('in_flight', 'done')),
    response_status      INTEGER,
    response_headers     JSONB,
    response_body        BYTEA,
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    locked_until         TIMESTAMPTZ NOT NULL,
    -- the request that holds (or completed) the key: begin and takeover write a
    -- fresh random token; completion and release name it (0003)
    owner_token          UUID,
    PRIMARY KEY (tenant_id, method, path, key),
    CONSTRAINT idempotency_done_has_response
        CHECK ((state = 'done') = (response_status IS NOT NULL)),
    CONSTRAINT idempotency_in_flight_has_owner
        CHECK (state = 'done' OR owner_token IS NOT NULL)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

-- The budget a credit answered, written in the credit's transaction: a replay
-- of the top-up answers this, the original body (SPEC §6).
CREATE TABLE credit_receipts (
    operation_id         TEXT PRIMARY KEY REFERENCES ledger_entries (operation_id),
    balance_usd_micros   BIGINT NOT NULL,
    reserved_usd_micros  BIGINT NOT NULL,
    ledger_version       BIGINT NOT NULL,
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- ---------------------------------------------------------------- the rules
-- (migration 0004) The database enforces SPEC §1's invariants 1-4 itself.
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

-- (0012) open_runs starts at 0 and moves only from inside runs_count_open (trigger
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
LANGUAGE plpgsql
-- (0009) index probes at any table size (migration 0009)
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
LANGUAGE plpgsql
-- (0009) index probes at any table size (migration 0009)
SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off
AS $$
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

-- (0012) tenants.open_runs: the runs each statement opened or closed.
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
LANGUAGE plpgsql
-- (0009) index probes at any table size (migration 0009)
SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off
AS $$
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

-- Per-key spend limits (migration 0005; SPEC §7): spent moves only with the
-- ledger, a reservation never takes it above the limit, a run keeps its key.

CREATE TRIGGER api_keys_no_truncate BEFORE TRUNCATE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION dpp_refuse_truncate();

-- spent moves only from inside the ledger trigger (depth >= 2, as for tenants).
CREATE FUNCTION api_keys_spent_from_ledger_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF pg_trigger_depth() < 2 THEN
        RAISE EXCEPTION 'dpp rule key_spent_from_ledger: key % spent changes only through '
            'ledger entries', NEW.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER api_keys_spent_starts_at_zero
    BEFORE INSERT ON api_keys
    FOR EACH ROW
    WHEN (NEW.spent_usd_micros <> 0)
    EXECUTE FUNCTION api_keys_spent_from_ledger_only();

CREATE TRIGGER api_keys_spent_moves_with_ledger
    BEFORE UPDATE ON api_keys
    FOR EACH ROW
    WHEN (OLD.spent_usd_micros IS DISTINCT FROM NEW.spent_usd_micros)
    EXECUTE FUNCTION api_keys_spent_from_ledger_only();

-- The key's limit, judged on every increase of spent (a reservation).
CREATE FUNCTION api_keys_spend_within_limit() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'dpp rule key_spend_limit: key % would spend % above its limit %',
        NEW.id, NEW.spent_usd_micros, NEW.spend_limit_usd_micros
        USING ERRCODE = 'integrity_constraint_violation';
END;
$$;

CREATE TRIGGER api_keys_spend_within_limit
    BEFORE UPDATE ON api_keys
    FOR EACH ROW
    WHEN (NEW.spent_usd_micros > OLD.spent_usd_micros
          AND NEW.spent_usd_micros > NEW.spend_limit_usd_micros)
    EXECUTE FUNCTION api_keys_spend_within_limit();

-- Derived, never written by hand: the spent at which the limit was last set.
CREATE FUNCTION api_keys_limit_remembers_spent() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT'
        OR NEW.spend_limit_usd_micros IS DISTINCT FROM OLD.spend_limit_usd_micros THEN
        NEW.spent_when_limit_set_usd_micros := NEW.spent_usd_micros;
    ELSE
        NEW.spent_when_limit_set_usd_micros := OLD.spent_when_limit_set_usd_micros;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER api_keys_limit_remembers_spent
    BEFORE INSERT OR UPDATE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION api_keys_limit_remembers_spent();

-- A run keeps the key it was submitted with (its counter moved by that key).
CREATE FUNCTION runs_key_fixed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'dpp rule run_key_fixed: run % keeps the key it was submitted with', OLD.id
        USING ERRCODE = 'integrity_constraint_violation';
END;
$$;

CREATE TRIGGER runs_key_fixed
    BEFORE UPDATE ON runs
    FOR EACH ROW
    WHEN (OLD.api_key_id IS DISTINCT FROM NEW.api_key_id)
    EXECUTE FUNCTION runs_key_fixed();

-- ---------------------------------------------------------------- the reservation's round trips
-- (0007) A reservation batch's statements, run in the caller's transaction in
-- two calls; nothing is decided here (dpp/money/ledger.py, reserve_batch).

-- (0008) The keys of the drafts that claim them are inserted after the tenant
-- lock (a record that exists wins): a keyed submit's record commits with its
-- reservation.
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
) LANGUAGE plpgsql VOLATILE
-- (0009) index probes at any table size (migration 0009)
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

-- (0008) 0007's signature: the same call without claims, for a replica of the
-- release before.
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
) LANGUAGE sql VOLATILE AS $$
    SELECT * FROM dpp_lock_reservation(
        p_tenant_id, p_methods, p_paths, p_keys, p_api_key_ids, p_remaining_ms,
        NULL::bytea[], NULL::uuid[], NULL::double precision[]);
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
) LANGUAGE plpgsql VOLATILE
-- (0009) index probes at any table size (migration 0009)
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

-- A reservation batch in one statement (0010): the locks of
-- dpp_lock_reservation, the admission rule of dpp.money.rules.decide_batch
-- (checked again in Python from the locked state it returns), the writes of
-- dpp_write_reservation; the lock waits bounded by the callers' time left.
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
) LANGUAGE plpgsql VOLATILE
-- (0009) index probes at any table size (migration 0009)
SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off SET jit = off
AS $$
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

-- (0009) A settlement batch's runs, locked in id order (two batches locking
-- overlapping runs cannot deadlock), with their plan's retention; was the
-- statement lock_runs.
CREATE FUNCTION dpp_lock_runs(p_run_ids TEXT[])
RETURNS TABLE (id TEXT, tenant_id TEXT, status TEXT, version BIGINT, lease_token UUID,
               reserved_usd_micros BIGINT, minimum_fee_usd_micros BIGINT,
               charged_usd_micros BIGINT, refunded_usd_micros BIGINT, retention_days INTEGER)
LANGUAGE plpgsql VOLATILE
-- (0009) index probes at any table size (migration 0009)
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
-- (0009) index probes at any table size (migration 0009)
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

-- (0011) A settlement batch in one statement: the locks of dpp_lock_runs, the
-- decision of dpp.money.ledger._decide_settlement (checked again in Python from
-- the locked state it returns), the writes of dpp_write_settlements.
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
