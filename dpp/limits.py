"""Every limit DPP enforces in more than one place, defined once.

"Put a limit on everything" (TigerBeetle style): these are the limits of the
contract (SPEC.md) and the sizes that bound memory and batches. Validators,
packs, the ledger, the actors and the OpenAPI document all import them from
here, so a limit cannot say one thing in a 422 and another in the document.
A limit that only one module can ever see stays in that module.
"""

from __future__ import annotations

from typing import Final

# --- money (SPEC §1) ---------------------------------------------------------------------

USD_MICROS: Final = 1_000_000  # one USD
# Money columns are Postgres BIGINT: no amount anywhere may exceed it.
USD_MICROS_MAX: Final = 2**63 - 1
# One credit top-up: ten million USD, far below the BIGINT ceiling however many.
CREDIT_USD_MICROS_MAX: Final = 10_000_000 * USD_MICROS
# an API key's spend limit (SPEC §7): 1 .. 10^13 micros (10 million USD)
SPEND_LIMIT_USD_MICROS_MAX: Final = 10**13

# --- runs (SPEC §3, §6) ------------------------------------------------------------------

TIMEBOX_SEC_MIN: Final = 1
TIMEBOX_SEC_MAX: Final = 3_600
METADATA_KEYS_MAX: Final = 50
METADATA_BYTES_MAX: Final = 16_384  # serialized JSON
RUNS_PAGE_LIMIT_DEFAULT: Final = 20
RUNS_PAGE_LIMIT_MAX: Final = 100
USAGE_DAYS_DEFAULT: Final = 30
USAGE_DAYS_MAX: Final = 366

# --- idempotency (SPEC §3, §6) -----------------------------------------------------------

IDEMPOTENCY_KEY_CHARS_MAX: Final = 255
IDEMPOTENCY_RETENTION_HOURS: Final = 24  # "kept at least 24 h"
# An in-flight key whose holder went quiet this long may be taken over.
IDEMPOTENCY_LOCK_S: Final = 60.0

# --- tenancy (SPEC §3, §6) ---------------------------------------------------------------

REQUESTS_PER_MINUTE_MAX: Final = 1_000_000
MAX_CONCURRENT_RUNS_MAX: Final = 100_000
RETENTION_DAYS_MAX: Final = 3_650
NAME_CHARS_MAX: Final = 200
PLAN_ID_CHARS_MAX: Final = 63

# --- batches and mailboxes (bounded memory, bounded transactions) -------------------------

# Reservations one budget actor (or settlements one settlement actor) commits in
# one transaction.
# Measured: ~40x the throughput of one transaction per reservation.
BUDGET_BATCH_MAX: Final = 64
BUDGET_MAILBOX_SIZE: Final = 1_024
# Budget actors one replica keeps alive at once (idle ones are evicted first);
# settlement actors likewise, in their own registry.
BUDGET_ACTORS_MAX: Final = 50_000
# What one ledger transaction may carry, whoever calls it.
LEDGER_BATCH_MAX: Final = 256
assert BUDGET_BATCH_MAX <= LEDGER_BATCH_MAX
# One claim never takes more runs than this, whatever the caller asks.
CLAIM_BATCH_MAX: Final = 256
RUN_MAILBOX_SIZE: Final = 8  # a beat or two and one pack result: never more in practice
RECONCILER_MAILBOX_SIZE: Final = 16

# --- repairs (the reconciler; docs/money.md) ----------------------------------------------

# A Redis hold whose Postgres commit was not reported back for this long (its
# budget actor crashed between the two writes) is taken for abandoned by drift
# repair and dropped. Far above any commit: a slower one is mirrored late, and
# drift repair puts it back once it is committed; Postgres guards meanwhile.
PENDING_HOLD_ABANDONED_S: Final = 900.0
# Consecutive reconcile passes in which a stuck CLAIMED run's evidence (its
# result object) could not be read before the run is set aside AUDIT_REQUIRED
# with a critical alert: missing evidence is never guessed (SPEC §1).
EVIDENCE_READ_FAILURES_MAX: Final = 10
# A QUEUED run announced on SQS this long ago that nothing claimed is announced
# again: its message may be lost (retention, purge, dead-letter expiry). A
# duplicate is harmless: claims are guarded, and the spare message is deleted.
QUEUED_MESSAGE_LOST_AFTER_SEC: Final = 900
