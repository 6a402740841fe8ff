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
        CHECK (balance_usd_micros - reserved_usd_micros >= 0)
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
    revoked_at           TIMESTAMPTZ
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
    )
);
CREATE INDEX runs_tenant_created ON runs (tenant_id, created_at DESC, id DESC);
CREATE INDEX runs_queued ON runs (created_at, id) WHERE status = 'QUEUED';
CREATE INDEX runs_queued_unsent ON runs (created_at)
    WHERE status = 'QUEUED' AND enqueued_at IS NULL;
CREATE INDEX runs_working_lease ON runs (lease_expires_at) WHERE status = 'PROCESSING';
CREATE INDEX runs_claimed ON runs (claimed_at) WHERE status = 'CLAIMED';
CREATE INDEX runs_open_by_tenant ON runs (tenant_id)
    WHERE status IN ('QUEUED', 'PROCESSING', 'CLAIMED');
CREATE INDEX runs_retention ON runs (retention_until)
    WHERE result_key IS NOT NULL AND result_deleted_at IS NULL;

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
