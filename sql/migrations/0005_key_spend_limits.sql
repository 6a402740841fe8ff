-- Per-key spend limits (SPEC §7). A key's spent = R of its open runs
-- (AUDIT_REQUIRED included) + charged of its settled runs, over the key's
-- life. Like a tenant's counters, spent moves only from the ledger's insert
-- trigger: a reserve entry adds R to the key of its run, a refund entry takes
-- the refund back (a charge moves nothing: it was spent when reserved). So a
-- run moves its key's counter exactly once each way, by the entries that the
-- ledger's unique (run_id, kind) index already allows only once.
--
-- Postgres refuses a reservation that would take spent above the limit (the
-- api_keys_spend_within_limit trigger: an *increase* of spent past the limit),
-- as the CHECK on tenants refuses available < 0. A limit lowered below spent
-- is allowed (nothing increases): it only stops further reservations until
-- refunds or a higher limit make room.
--
-- spent_when_limit_set_usd_micros: what spent was when the limit was last set
-- (a trigger writes it; nothing else can). The audit's evidence for invariant
-- 6: spent only rises through reservations, each of which the trigger keeps
-- within the limit, so a key above its limit must be at or below the spent
-- its limit was set at (a lowered limit); anything else is a violation.
--
-- runs.api_key_id: the key a run was submitted with (NULL: before this
-- migration, or not through a key), fixed for the run's life; the composite
-- foreign key keeps it one of the run's own tenant's keys.

ALTER TABLE api_keys ADD COLUMN spend_limit_usd_micros BIGINT
    CHECK (spend_limit_usd_micros BETWEEN 1 AND 10000000000000);
ALTER TABLE api_keys ADD COLUMN spent_usd_micros BIGINT NOT NULL DEFAULT 0
    CHECK (spent_usd_micros >= 0);
ALTER TABLE api_keys ADD COLUMN spent_when_limit_set_usd_micros BIGINT NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD CONSTRAINT api_keys_id_tenant UNIQUE (id, tenant_id);

ALTER TABLE runs ADD COLUMN api_key_id TEXT;
ALTER TABLE runs ADD CONSTRAINT runs_api_key_of_tenant
    FOREIGN KEY (api_key_id, tenant_id) REFERENCES api_keys (id, tenant_id);
CREATE INDEX runs_api_key ON runs (api_key_id) WHERE api_key_id IS NOT NULL;

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

-- The ledger trigger of 0004, now also moving the keys' spent.
CREATE OR REPLACE FUNCTION ledger_entries_apply() RETURNS trigger
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
        JOIN runs r ON r.id = e.run_id
        WHERE e.kind IN ('reserve', 'refund') AND r.api_key_id IS NOT NULL
        GROUP BY r.api_key_id
        ORDER BY r.api_key_id
    ) AS d
    WHERE k.id = d.api_key_id AND d.spent_delta <> 0;
    RETURN NULL;
END;
$$;
