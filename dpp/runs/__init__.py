"""Runs: the run object and the idempotency keys of submissions."""
