"""`dpp mcp`: DPP's MCP tools over stdio, for local MCP clients, against a remote DPP.

The same tools as a replica's ``/mcp`` (``dpp.http.mcp_tools``), answered by a
DPP's HTTP API through the Python client (``dpp.cli.mcp_remote``): ``--url``
(default ``DPP_URL``) and the API key from ``DPP_API_KEY`` only — never a
flag, which would land in shell history and process listings. Each tool
call's idempotency key is the one the client sent in ``_meta``, else derived
from this process's random session id and the JSON-RPC request id, so a
client's retry of a call (same id) creates no second run.

stdout is the protocol channel: nothing else is ever written to it (logs go to
stderr).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import anyio

from dpp.cli.common import EXIT_OK
from dpp.config import ConfigError

__all__ = ["register"]

WAIT_SEC_DEFAULT = 60
WAIT_SEC_MAX = 3_600
CLIENT_MISSING = (
    "dpp mcp needs the Python client dpp-client: pip install ./clients/python"
    " (from the DPP repository; ./scripts/dev and ./scripts/test install it)"
)


def command_mcp(args: argparse.Namespace) -> int:
    url = args.url or os.environ.get("DPP_URL")
    if not url or not url.startswith(("http://", "https://")):
        raise ConfigError("dpp mcp needs --url or DPP_URL: the http(s) URL of a DPP")
    api_key = os.environ.get("DPP_API_KEY", "").strip()
    if not api_key:
        raise ConfigError("dpp mcp needs the API key in DPP_API_KEY (never a flag)")
    raw_wait = os.environ.get("DPP_MCP_WAIT_SEC", str(WAIT_SEC_DEFAULT))
    if not raw_wait.isdigit() or int(raw_wait) > WAIT_SEC_MAX:
        raise ConfigError("DPP_MCP_WAIT_SEC must be an integer from 0 to 3600")
    try:
        from dpp.cli.mcp_remote import serve_stdio
    except ModuleNotFoundError as error:
        if error.name != "dpp_client":
            raise
        raise ConfigError(CLIENT_MISSING) from None
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    anyio.run(serve_stdio, url, api_key, int(raw_wait), backend="asyncio")
    return EXIT_OK


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "mcp",
        help="serve DPP's MCP tools over stdio, against a DPP reached over HTTP",
        description=(
            "Run an MCP server on stdin/stdout for a local MCP client (one process per "
            "client session). Its tools call the DPP at --url (or DPP_URL) with the API "
            "key in DPP_API_KEY. DPP_MCP_WAIT_SEC (default 60) bounds how long a tool "
            "call waits for its run."
        ),
    )
    parser.add_argument("--url", help="the DPP to call, e.g. https://dpp.example.com")
    parser.set_defaults(handler=command_mcp)
