"""The backend of `dpp mcp`: a remote DPP's ``/v1``, through the Python client (SPEC §7).

Everything that talks HTTP is ``dpp_client.AsyncClient``'s: the submit's
``Idempotency-Key`` (the tool call's, reused on every retry), the retry policy
(connection errors, ``429``, ``503``, ``409`` idempotency-key-in-use, with
``Retry-After``), the problem documents as ``DPPError``s, and the result
download with its ``sha256`` and size check. This module only turns the
client's typed answers back into the documents the tools render
(``dpp.http.mcp_tools.Backend``) and its errors into ``Refused`` problems.

Imported only by ``dpp mcp`` itself: ``dpp-client`` is a separate distribution
(``pip install ./clients/python``), and every other command works without it.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import asdict
from datetime import date, datetime
from typing import Any

from dpp_client import AsyncClient, DPPError, RateLimited, Run
from mcp.server import ServerRequestContext
from mcp.server.stdio import stdio_server

from dpp.http.mcp_tools import (
    RESULT_INLINE_BYTES_MAX,
    Backend,
    Refused,
    build_server,
    call_key,
)

__all__ = ["RemoteBackend", "serve_stdio"]

log = logging.getLogger("dpp.cli.mcp")

REQUEST_TIMEOUT_S = 30.0


def _plain(value: Any) -> Any:
    """A model's members as the JSON the API sent (times as ISO 8601 text)."""
    if isinstance(value, dict):
        return {name: _plain(member) for name, member in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(member) for member in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


def _document(model: Any) -> dict[str, Any]:
    document: dict[str, Any] = _plain(asdict(model))
    return document


def _refused(error: DPPError) -> Refused:
    """The client's error as the problem an ``isError`` result carries."""
    problem = dict(error.problem)
    if error.status is not None:
        problem.setdefault("status", error.status)
    if isinstance(error, RateLimited) and error.retry_after is not None:
        problem.setdefault("retry_after_s", round(error.retry_after))
    return Refused(problem)


class RemoteBackend:
    """The tools' backend in ``dpp mcp``: a DPP's ``/v1`` through ``AsyncClient``."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._catalog: list[dict[str, Any]] | None = None

    async def catalog(self) -> list[dict[str, Any]]:
        if self._catalog is None:
            try:
                packs = await self._client.packs()
            except DPPError as error:
                # no tools until DPP answers (e.g. a bad key): tools/list says so
                log.warning("GET /v1/packs failed: %s", error)
                return []
            self._catalog = [_document(pack) for pack in packs]
        return self._catalog

    async def submit(
        self, pack_type: str, inputs: Any, idempotency_key: str | None
    ) -> dict[str, Any] | Refused:
        try:
            run = await self._client.runs.create(pack_type, inputs, idempotency_key=idempotency_key)
        except DPPError as error:
            return _refused(error)
        return _document(run)

    async def run(self, run_id: str) -> dict[str, Any] | Refused:
        try:
            run = await self._client.runs.get(run_id)
        except DPPError as error:
            return _refused(error)
        return _document(run)

    async def result(self, run: dict[str, Any]) -> Any:
        completed = Run.from_json(run)
        link = completed.result
        if link is None or link.bytes > RESULT_INLINE_BYTES_MAX:
            return None
        try:
            # the client checks the body's sha256 and size against the run's promise
            document = await self._client.runs.result(completed)
        except DPPError as error:
            log.warning("run %s: its result could not be fetched: %s", completed.id, error)
            return None
        return None if isinstance(document, bytes) else document

    async def budget(self) -> dict[str, Any] | Refused:
        try:
            budget = await self._client.budget()
        except DPPError as error:
            return _refused(error)
        return _document(budget)


async def serve_stdio(url: str, api_key: str, wait_sec: int) -> None:
    session_id = secrets.token_hex(16)  # this process is the MCP session
    # DPP scopes idempotency keys to the tenant; the tools scope a call's key to the
    # API key (as /mcp does with its id), here by the key's digest, never the key
    key_scope = "stdio-" + hashlib.sha256(api_key.encode()).hexdigest()
    async with AsyncClient(url, api_key, timeout=REQUEST_TIMEOUT_S) as client:
        backend = RemoteBackend(client)

        def backend_of(ctx: ServerRequestContext[Any, Any]) -> Backend:
            return backend

        def key_of(ctx: ServerRequestContext[Any, Any]) -> str | Refused | None:
            return call_key(ctx, key_scope, session_id, header=None)

        server = build_server("dpp", backend_of=backend_of, key_of=key_of, wait_sec=wait_sec)
        async with stdio_server() as (read_stream, write_stream):
            await server.run(read_stream, write_stream, server.create_initialization_options())
