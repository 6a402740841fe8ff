"""The `dpp` command (entry point ``dpp.cli.main:main``).

``main`` builds the parser and runs the commands; ``tenancy`` (plan, tenant,
key) and ``credits`` add their own.
"""
