-- Money: credits, reservations, settlements, budgets. Every write is a
-- conditional statement whose row count the caller checks (dpp/money/ledger.py).
-- No statement here writes a tenant's counters: the ledger's insert trigger
-- moves them from the entries (sql/migrations/0004_database_rules.sql), and the
-- caller reads them back with tenant_counters_of.

-- name: lock_reservation
-- A reservation's locks and reads alone (migrations 0007, 0008): the tenant
-- row, the claims of the drafts' idempotency keys, the batch's keys, its API
-- keys' spend, the open-run count. Since 0010 the ledger reserves with
-- `reserve`, which calls the same function; tests use this one to hold a
-- reservation's locks open inside a transaction of their own.
SELECT * FROM dpp_lock_reservation($1, $2::text[], $3::text[], $4::text[], $5::text[],
                                   $6::double precision[], $7::bytea[], $8::uuid[],
                                   $9::double precision[]);

-- name: reserve
-- A reservation batch in one round trip and one transaction (migration 0010):
-- dpp_reserve locks as lock_reservation does, decides each draft, and writes
-- the admitted ones with dpp_write_reservation (dpp/money/ledger.py checks the
-- decisions against dpp.money.rules). Sent outside BEGIN: it commits itself.
SELECT * FROM dpp_reserve($1, $2::text[], $3::text[], $4::jsonb[], $5::jsonb[],
                          $6::bigint[], $7::bigint[], $8::int[], $9::text[],
                          $10::timestamptz[], $11::text[], $12::double precision[],
                          $13::double precision, $14::text[], $15::text[], $16::text[],
                          $17::uuid[], $18::bytea[], $19::double precision[], $20::int[],
                          $21::jsonb[], $22::bytea[]);

-- name: lock_tenant_budget
SELECT t.balance_usd_micros, t.reserved_usd_micros, t.ledger_version,
       p.max_concurrent_runs, p.retention_days
FROM tenants t JOIN plans p ON p.id = t.plan_id
WHERE t.id = $1
FOR UPDATE OF t;

-- name: insert_credit_entry
INSERT INTO ledger_entries (tenant_id, run_id, kind, amount_usd_micros, operation_id)
VALUES ($1, NULL, 'credit', $2, $3)
ON CONFLICT (operation_id) DO NOTHING
RETURNING id;

-- name: credit_entry_by_operation
-- The credit and the budget it answered (no receipt: credited before 0003).
SELECT e.tenant_id, e.amount_usd_micros,
       c.balance_usd_micros, c.reserved_usd_micros, c.ledger_version
FROM ledger_entries e LEFT JOIN credit_receipts c ON c.operation_id = e.operation_id
WHERE e.operation_id = $1 AND e.kind = 'credit';

-- name: insert_credit_receipt
INSERT INTO credit_receipts (operation_id, balance_usd_micros, reserved_usd_micros,
                             ledger_version)
VALUES ($1, $2, $3, $4);

-- name: settle
-- A settlement batch in one round trip and one transaction (migration 0011):
-- dpp_settle locks the runs in id order, decides each request, and writes the
-- settled ones with dpp_write_settlements (dpp/money/ledger.py checks the
-- decisions against _decide_settlement). Sent outside BEGIN: it commits itself.
SELECT * FROM dpp_settle($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[],
                         $6::bigint[], $7::bigint[], $8::jsonb[], $9::text[], $10::text[],
                         $11::bigint[], $12::text[]);

-- name: mark_audit_required
UPDATE runs
SET status = 'AUDIT_REQUIRED', lease_token = NULL, lease_expires_at = NULL,
    error = $2, version = version + 1
WHERE id = $1 AND version = $3 AND status IN ('QUEUED', 'PROCESSING', 'CLAIMED')
RETURNING id;

-- name: tenant_counters_of
-- After a ledger insert: the counters its trigger just wrote (tenants in $1).
SELECT id, balance_usd_micros, reserved_usd_micros, ledger_version
FROM tenants WHERE id = ANY($1::text[]);

-- name: tenant_budget
SELECT t.balance_usd_micros, t.reserved_usd_micros, t.ledger_version,
       p.id AS plan_id, p.requests_per_minute, p.max_concurrent_runs, p.retention_days
FROM tenants t JOIN plans p ON p.id = t.plan_id
WHERE t.id = $1;

-- name: audit_tenant_sums
-- Invariants 1-3 per tenant, from the ledger and the runs; and the open runs
-- the tenant's row counts (0012) against the runs.
SELECT t.id AS tenant_id,
       t.balance_usd_micros, t.reserved_usd_micros, t.open_runs,
       COALESCE(l.credits, 0)::bigint AS credits, COALESCE(l.charges, 0)::bigint AS charges,
       COALESCE(l.reserves, 0)::bigint AS reserves, COALESCE(l.released, 0)::bigint AS released,
       COALESCE(r.open_reserved, 0)::bigint AS open_reserved,
       COALESCE(r.open_count, 0)::bigint AS open_count
FROM tenants t
LEFT JOIN (
    SELECT tenant_id,
           sum(amount_usd_micros) FILTER (WHERE kind = 'credit') AS credits,
           sum(amount_usd_micros) FILTER (WHERE kind = 'charge') AS charges,
           sum(amount_usd_micros) FILTER (WHERE kind = 'reserve') AS reserves,
           sum(amount_usd_micros) FILTER (WHERE kind IN ('charge', 'refund')) AS released
    FROM ledger_entries GROUP BY tenant_id
) l ON l.tenant_id = t.id
LEFT JOIN (
    -- open runs hold R; an AUDIT_REQUIRED run holds what its ledger entries show
    SELECT r.tenant_id,
           sum(CASE WHEN r.status = 'AUDIT_REQUIRED' THEN COALESCE(h.held, 0)
                    ELSE r.reserved_usd_micros END) AS open_reserved,
           count(*) FILTER (WHERE r.status <> 'AUDIT_REQUIRED') AS open_count
    FROM runs r
    LEFT JOIN (
        SELECT run_id, sum(CASE WHEN kind = 'reserve' THEN amount_usd_micros
                                ELSE -amount_usd_micros END) AS held
        FROM ledger_entries WHERE run_id IS NOT NULL GROUP BY run_id
    ) h ON h.run_id = r.id
    WHERE r.status IN ('QUEUED', 'PROCESSING', 'CLAIMED', 'AUDIT_REQUIRED')
    GROUP BY r.tenant_id
) r ON r.tenant_id = t.id
WHERE $1::text IS NULL OR t.id = $1;

-- name: audit_runs
-- Invariant 4, and the ledger evidence of every run: one row per run with a problem.
SELECT r.id AS run_id, r.tenant_id, r.status, r.reserved_usd_micros,
       r.charged_usd_micros, r.refunded_usd_micros,
       l.reserve_count, l.reserve_amount, l.charge_count, l.charge_amount,
       l.refund_count, l.refund_amount
FROM runs r
LEFT JOIN (
    SELECT run_id,
           count(*) FILTER (WHERE kind = 'reserve') AS reserve_count,
           sum(amount_usd_micros) FILTER (WHERE kind = 'reserve')::bigint AS reserve_amount,
           count(*) FILTER (WHERE kind = 'charge') AS charge_count,
           sum(amount_usd_micros) FILTER (WHERE kind = 'charge')::bigint AS charge_amount,
           count(*) FILTER (WHERE kind = 'refund') AS refund_count,
           sum(amount_usd_micros) FILTER (WHERE kind = 'refund')::bigint AS refund_amount
    FROM ledger_entries WHERE run_id IS NOT NULL GROUP BY run_id
) l ON l.run_id = r.id
WHERE ($1::text IS NULL OR r.tenant_id = $1)
  AND r.status <> 'AUDIT_REQUIRED'
  AND (
    COALESCE(l.reserve_count, 0) <> 1
    OR COALESCE(l.reserve_amount, 0) <> r.reserved_usd_micros
    OR (r.status IN ('COMPLETED', 'FAILED', 'EXPIRED', 'CANCELED') AND (
        COALESCE(l.charge_count, 0) <> 1 OR COALESCE(l.refund_count, 0) <> 1
        OR l.charge_amount IS DISTINCT FROM r.charged_usd_micros
        OR l.refund_amount IS DISTINCT FROM r.refunded_usd_micros
        OR r.charged_usd_micros + r.refunded_usd_micros <> r.reserved_usd_micros))
    OR (r.status NOT IN ('COMPLETED', 'FAILED', 'EXPIRED', 'CANCELED') AND (
        COALESCE(l.charge_count, 0) <> 0 OR COALESCE(l.refund_count, 0) <> 0))
  )
LIMIT 1000;

-- name: audit_required_runs
SELECT id, tenant_id, reserved_usd_micros, error, created_at
FROM runs WHERE status = 'AUDIT_REQUIRED' AND ($1::text IS NULL OR tenant_id = $1)
ORDER BY created_at LIMIT 1000;

-- name: audit_key_spend
-- Invariant 6 per key: spent against what its runs imply (open runs hold R, an
-- AUDIT_REQUIRED run what its ledger entries hold, a settled run its charge),
-- and a key above its limit only where a lowered limit explains it (spent no
-- higher than when the limit was set: spent rises only by reservations, each
-- kept within the limit in force). One row per key with a problem.
SELECT k.id AS key_id, k.tenant_id, k.spend_limit_usd_micros, k.spent_usd_micros,
       k.spent_when_limit_set_usd_micros, COALESCE(r.implied, 0)::bigint AS implied
FROM api_keys k
LEFT JOIN (
    SELECT r.api_key_id,
           sum(CASE WHEN r.status IN ('QUEUED', 'PROCESSING', 'CLAIMED')
                        THEN r.reserved_usd_micros
                    WHEN r.status = 'AUDIT_REQUIRED' THEN COALESCE(h.held, 0)
                    ELSE r.charged_usd_micros END) AS implied
    FROM runs r
    LEFT JOIN (
        SELECT run_id, sum(CASE WHEN kind = 'reserve' THEN amount_usd_micros
                                ELSE -amount_usd_micros END) AS held
        FROM ledger_entries WHERE run_id IS NOT NULL GROUP BY run_id
    ) h ON h.run_id = r.id AND r.status = 'AUDIT_REQUIRED'
    WHERE r.api_key_id IS NOT NULL
    GROUP BY r.api_key_id
) r ON r.api_key_id = k.id
WHERE ($1::text IS NULL OR k.tenant_id = $1)
  AND (k.spent_usd_micros <> COALESCE(r.implied, 0)
       OR (k.spent_usd_micros > k.spend_limit_usd_micros
           AND k.spent_usd_micros > k.spent_when_limit_set_usd_micros))
ORDER BY k.id
LIMIT 1000;

-- name: key_budget
-- GET /v1/budget in one round trip and one snapshot: the tenant's counters and
-- plan (as tenant_budget), and the calling key's limit and spent, NULL when the
-- key is not the tenant's. One snapshot: the key's room is judged against the
-- available it is shown beside, never against a reservation's other half.
SELECT t.balance_usd_micros, t.reserved_usd_micros, t.ledger_version,
       p.id AS plan_id, p.requests_per_minute, p.max_concurrent_runs, p.retention_days,
       k.id AS key_id, k.spend_limit_usd_micros, k.spent_usd_micros
FROM tenants t
JOIN plans p ON p.id = t.plan_id
LEFT JOIN api_keys k ON k.id = $2 AND k.tenant_id = t.id
WHERE t.id = $1;

-- name: tenant_ids_page
SELECT id FROM tenants WHERE id > $1 ORDER BY id LIMIT $2;

-- name: tenant_counters
-- What the Redis mirror must equal: all tenants, or those in $1.
SELECT id, balance_usd_micros, reserved_usd_micros, ledger_version
FROM tenants WHERE $1::text[] IS NULL OR id = ANY($1::text[]);

-- name: reserved_run_ids
-- Which of these runs Postgres holds a reservation for (drift repair: a
-- pending Redis hold whose run is here was committed).
SELECT run_id FROM ledger_entries WHERE kind = 'reserve' AND run_id = ANY($1::text[]);
