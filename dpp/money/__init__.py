"""Money: the rules of SPEC §1 and the stores that keep them.

``rules`` is pure (statuses, the settlement table, admission decisions);
``ledger`` is the durable truth in Postgres; ``mirror`` the Redis fast path;
``drift`` repairs the mirror from the ledger; ``audit`` proves the invariants
from storage; ``accounts`` answers the reads the API serves. Nothing here
moves money on its own initiative: the budget and settlement actors
(``dpp.actors``) call the ledger, and nothing else does.
"""
