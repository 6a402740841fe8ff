"""The `dpp` command (entry point ``dpp.cli.main:main``).

``main`` builds the parser and runs serve, migrate and audit; ``dev``,
``tenancy`` (plan, tenant, key) and ``credits`` add their own commands;
``common`` holds what they share, including the one helper that opens and
closes the stores a command works on.
"""
