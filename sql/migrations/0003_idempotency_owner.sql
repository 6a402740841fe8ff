-- Idempotency owners and credit receipts.
--
-- owner_token: the random token of the request that holds an in-flight key,
-- written at begin and at takeover. Whatever completes or releases the key
-- (the reservation's transaction, a stored 402, a release after a failure)
-- names the token and touches the record only if it still owns it, so a
-- request whose lock expired and was taken over can no longer complete it,
-- and a reservation committed late is refused rather than charged twice.
-- Records in flight while this migrates get a fresh token: their holders
-- cannot complete them any more, and their lock expires as before.
--
-- credit_receipts: the budget a credit answered, written in the credit's own
-- transaction, so a replay of the top-up answers the original body (SPEC §6)
-- rather than the budget of the moment.

ALTER TABLE idempotency_keys ADD COLUMN owner_token UUID;
UPDATE idempotency_keys SET owner_token = gen_random_uuid() WHERE state = 'in_flight';
ALTER TABLE idempotency_keys ADD CONSTRAINT idempotency_in_flight_has_owner
    CHECK (state = 'done' OR owner_token IS NOT NULL);

CREATE TABLE credit_receipts (
    operation_id         TEXT PRIMARY KEY REFERENCES ledger_entries (operation_id),
    balance_usd_micros   BIGINT NOT NULL,
    reserved_usd_micros  BIGINT NOT NULL,
    ledger_version       BIGINT NOT NULL,
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now()
);
