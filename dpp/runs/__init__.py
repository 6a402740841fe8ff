"""Runs: from a submission to a settled run, as the API sees them.

``submission`` parses and checks a ``POST /v1/runs`` body (pure);
``admission`` takes its idempotency key, reserves its money through the budget
actor and announces it to the queue; ``documents`` renders the run object
(pure); ``service`` reads, pages, cancels, counts and resolves runs;
``store`` holds the run rows' SQL; ``idempotency`` the keys; ``failures`` the
typed reasons a run did not complete.
"""
