"""`dpp mcp`: DPP's MCP tools over stdio, for local MCP clients, against a remote DPP.

The same tools as a replica's ``/mcp`` (``dpp.http.mcp_tools``), answered by a
DPP's HTTP API: ``--url`` (default ``DPP_URL``) and the API key from
``DPP_API_KEY`` only — never a flag, which would land in shell history and
process listings. Each tool call's idempotency key is derived from this
process's random session id and the JSON-RPC request id, so a client's retry
of a call (same id) creates no second run.

stdout is the protocol channel: nothing else is ever written to it (logs go to
stderr).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import secrets
import sys
from typing import Any
from urllib.parse import quote

import anyio
import httpx2
import orjson
from mcp.server import ServerRequestContext
from mcp.server.stdio import stdio_server

from dpp.cli.common import EXIT_OK
from dpp.config import ConfigError
from dpp.http.mcp_tools import (
    RESULT_INLINE_BYTES_MAX,
    Backend,
    Refused,
    build_server,
    idempotency_key,
)

__all__ = ["RemoteBackend", "register"]

log = logging.getLogger("dpp.cli.mcp")

REQUEST_TIMEOUT_S = 30.0
WAIT_SEC_DEFAULT = 60
RETRY_AFTER_S_MAX = 3_600


def _problem_of(response: httpx2.Response) -> Refused:
    try:
        problem = response.json()
    except ValueError:
        problem = None
    if not isinstance(problem, dict):
        problem = {
            "title": response.reason_phrase or "Error",
            "status": response.status_code,
            "detail": f"DPP answered HTTP {response.status_code}.",
        }
    retry_after = response.headers.get("retry-after", "")
    if retry_after.isdigit() and "retry_after_s" not in problem:
        problem["retry_after_s"] = min(int(retry_after), RETRY_AFTER_S_MAX)
    return Refused(problem)


def _unreachable(url: str, error: Exception) -> Refused:
    return Refused(
        {
            "title": "Service Unavailable",
            "status": 503,
            "detail": f"DPP at {url} did not answer ({type(error).__name__}).",
            "retry_after_s": 1,
        }
    )


class RemoteBackend:
    """The tools' backend in ``dpp mcp``: a DPP's ``/v1`` over HTTP."""

    def __init__(self, client: httpx2.AsyncClient, url: str) -> None:
        self._client = client
        self._url = url.rstrip("/")
        self._catalog: list[dict[str, Any]] | None = None

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any] | Refused:
        try:
            response = await self._client.request(method, self._url + path, **kwargs)
        except httpx2.HTTPError as error:
            return _unreachable(self._url, error)
        if response.status_code >= 400:
            return _problem_of(response)
        document: dict[str, Any] = response.json()
        return document

    async def catalog(self) -> list[dict[str, Any]]:
        if self._catalog is None:
            answer = await self._call("GET", "/v1/packs")
            if isinstance(answer, Refused):
                return []  # no tools until DPP answers (e.g. a bad key): tools/list says so
            self._catalog = answer["packs"]
        return self._catalog

    async def submit(
        self, pack_type: str, inputs: Any, idempotency_key: str | None
    ) -> dict[str, Any] | Refused:
        headers = {} if idempotency_key is None else {"Idempotency-Key": idempotency_key}
        body = {"pack_type": pack_type, "inputs": inputs}
        return await self._call("POST", "/v1/runs", json=body, headers=headers)

    async def run(self, run_id: str) -> dict[str, Any] | Refused:
        return await self._call("GET", f"/v1/runs/{quote(run_id, safe='')}")

    async def result(self, run: dict[str, Any]) -> Any:
        link = run.get("result")
        if not isinstance(link, dict) or link.get("bytes", 0) > RESULT_INLINE_BYTES_MAX:
            return None
        url = link["download_url"]
        if url.startswith("/"):  # a local results store's link is relative to the API
            url = self._url + url
        try:
            # without the API key: the link is its own credential (presigned or signed)
            async with httpx2.AsyncClient(timeout=REQUEST_TIMEOUT_S) as download:
                response = await download.get(url)
        except httpx2.HTTPError:
            return None
        body = response.content
        if response.status_code != 200 or hashlib.sha256(body).hexdigest() != link["sha256"]:
            return None
        return orjson.loads(body)

    async def budget(self) -> dict[str, Any] | Refused:
        return await self._call("GET", "/v1/budget")


async def serve_stdio(url: str, api_key: str, wait_sec: int) -> None:
    session_id = secrets.token_hex(16)  # this process is the MCP session
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx2.AsyncClient(headers=headers, timeout=REQUEST_TIMEOUT_S) as client:
        backend = RemoteBackend(client, url)

        def backend_of(ctx: ServerRequestContext[Any, Any]) -> Backend:
            return backend

        def key_of(ctx: ServerRequestContext[Any, Any]) -> str | None:
            if ctx.request_id is None:
                return None
            return idempotency_key("stdio", session_id, ctx.request_id)

        server = build_server("dpp", backend_of=backend_of, key_of=key_of, wait_sec=wait_sec)
        async with stdio_server() as (read_stream, write_stream):
            await server.run(read_stream, write_stream, server.create_initialization_options())


def command_mcp(args: argparse.Namespace) -> int:
    url = args.url or os.environ.get("DPP_URL")
    if not url or not url.startswith(("http://", "https://")):
        raise ConfigError("dpp mcp needs --url or DPP_URL: the http(s) URL of a DPP")
    api_key = os.environ.get("DPP_API_KEY", "").strip()
    if not api_key:
        raise ConfigError("dpp mcp needs the API key in DPP_API_KEY (never a flag)")
    raw_wait = os.environ.get("DPP_MCP_WAIT_SEC", str(WAIT_SEC_DEFAULT))
    if not raw_wait.isdigit() or int(raw_wait) > RETRY_AFTER_S_MAX:
        raise ConfigError("DPP_MCP_WAIT_SEC must be an integer from 0 to 3600")
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
