"""``AsyncClient``: ``Client``'s twin with coroutines. Its logic is ``_core``'s; this module
only sends and sleeps (``anyio.sleep``, which comes with httpx: asyncio and trio alike)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import UTC, date, datetime
from types import TracebackType
from typing import Any

import anyio
import httpx

from dpp_client import _core
from dpp_client._errors import ConnectionFailed, RunFailed, client_problem
from dpp_client._models import (
    FAILED_STATUSES,
    Budget,
    Pack,
    Run,
    RunPage,
    Usage,
    packs_from_json,
)


def _now() -> datetime:
    return datetime.now(UTC)


class AsyncClient:
    """An asyncio (or trio) DPP client: ``Client``'s methods, as coroutines.

    ``base_url`` and ``api_key`` default to ``DPP_URL`` and ``DPP_API_KEY``.
    Use it as an async context manager (or await ``aclose``).
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        max_retries: int = 3,
    ) -> None:
        self._settings = _core.resolve_settings(base_url, api_key, max_retries)
        self._policy = _core.RetryPolicy(self._settings.max_retries)
        self._http = httpx.AsyncClient(base_url=self._settings.base_url, timeout=timeout)
        self.runs = AsyncRuns(self)

    @property
    def base_url(self) -> str:
        return self._settings.base_url

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, request: _core.Request) -> _core.Response:
        """Send ``request`` (the same bytes each time), retrying as the policy says."""
        headers = request.header_map(self._settings.api_key)
        attempt = 0
        while True:
            try:
                answer = await self._http.request(
                    request.method,
                    request.url,
                    # None, not (): httpx would re-encode a presigned URL's query
                    params=request.params or None,
                    content=request.content,
                    headers=headers,
                )
            except httpx.TransportError as error:
                delay_s = self._policy.after_error(attempt)
                if delay_s is None:
                    raise ConnectionFailed(
                        None,
                        client_problem(
                            "connection-failed",
                            "DPP could not be reached",
                            # no query: a download link's query is its credential
                            f"{request.method} {request.url.split('?', 1)[0]}: {error!r}"
                            f" after {attempt + 1} attempt(s)",
                        ),
                    ) from error
            else:
                response = _core.Response(answer.status_code, answer.headers, answer.content)
                delay_s = self._policy.after_response(attempt, response, _now())
                if delay_s is None:
                    return response
            await anyio.sleep(delay_s)
            attempt += 1

    async def _json(self, request: _core.Request) -> Any:
        return _core.parse_json(await self._send(request), _now())

    async def run(
        self,
        pack_type: str,
        inputs: Any,
        *,
        max_cost_usd_micros: int | None = None,
        timebox_sec: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        timeout: float = 300.0,  # noqa: ASYNC109 (SPEC §7: the same signature as Client)
    ) -> Any:
        """Create a run, wait for it, and return its verified result document.

        ``RunFailed`` if it ends FAILED or EXPIRED (``error.run`` says what was
        charged); ``TimeoutError`` if it is still running after ``timeout`` s.
        """
        created = await self.runs.create(
            pack_type,
            inputs,
            max_cost_usd_micros=max_cost_usd_micros,
            timebox_sec=timebox_sec,
            metadata=metadata,
            idempotency_key=idempotency_key,
        )
        finished = await self.runs.wait(created, timeout=timeout)
        if finished.status in FAILED_STATUSES:
            raise RunFailed(finished)
        return await self.runs.result(finished)

    async def budget(self) -> Budget:
        return Budget.from_json(await self._json(_core.build_budget()))

    async def usage(self, from_: date | str | None = None, to: date | str | None = None) -> Usage:
        return Usage.from_json(await self._json(_core.build_usage(from_, to)))

    async def packs(self) -> tuple[Pack, ...]:
        return packs_from_json(await self._json(_core.build_packs()))


class AsyncRuns:
    """``client.runs``: create, get, list, cancel, wait for and download runs."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def create(
        self,
        pack_type: str,
        inputs: Any,
        *,
        max_cost_usd_micros: int | None = None,
        timebox_sec: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Run:
        """Submit a run. Without ``idempotency_key`` a fresh one is made, and every
        retry of this call sends it again, so a retried submit never makes two runs."""
        request = _core.build_create(
            pack_type,
            inputs,
            max_cost_usd_micros=max_cost_usd_micros,
            timebox_sec=timebox_sec,
            metadata=metadata,
            idempotency_key=idempotency_key,
        )
        return Run.from_json(await self._client._json(request))

    async def get(self, run_id: str | Run) -> Run:
        run_id = run_id.id if isinstance(run_id, Run) else run_id
        return Run.from_json(await self._client._json(_core.build_get(run_id)))

    async def cancel(self, run_id: str | Run) -> Run:
        """Cancel a QUEUED run (full refund); ``Conflict`` once it has started."""
        run_id = run_id.id if isinstance(run_id, Run) else run_id
        return Run.from_json(await self._client._json(_core.build_cancel(run_id)))

    async def page(
        self,
        *,
        status: str | Iterable[str] | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> RunPage:
        """One page of runs, newest first (``list`` follows the cursors for you)."""
        request = _core.build_list(status=status, limit=limit, cursor=cursor)
        return RunPage.from_json(await self._client._json(request))

    async def list(
        self, *, status: str | Iterable[str] | None = None, limit: int | None = None
    ) -> AsyncIterator[Run]:
        """Every matching run, newest first, page after page (``limit``: the page size)."""
        cursor: str | None = None
        while True:
            page = await self.page(status=status, limit=limit, cursor=cursor)
            for run in page.data:
                yield run
            if not page.has_more:
                return
            assert page.next_cursor is not None, "has_more without next_cursor"
            cursor = page.next_cursor

    async def wait(
        self,
        run_id: str | Run,
        *,
        timeout: float = 300.0,  # noqa: ASYNC109 (SPEC §7: the same signature as Client)
    ) -> Run:
        """Poll with backoff until the run is terminal; ``TimeoutError`` past ``timeout`` s."""
        run_id = run_id.id if isinstance(run_id, Run) else run_id
        schedule = _core.PollSchedule(run_id, timeout, time.monotonic())
        while True:
            run = await self.get(run_id)
            if run.terminal:
                return run
            await anyio.sleep(schedule.delay_s(run, time.monotonic()))

    async def result(self, run: str | Run) -> Any:
        """Download a COMPLETED run's result, check its ``sha256`` and size, parse it.

        ``ResultIntegrityError`` when the bytes differ from what the run
        promises; ``RunFailed`` for a FAILED or EXPIRED run.
        """
        current = run if isinstance(run, Run) else await self.get(run)
        if _core.needs_fresh_link(current, _now()):
            current = await self.get(current.id)
        link = _core.result_link(current)
        response = await self._client._send(_core.build_download(link))
        return _core.parse_result(current.id, link, response, _now())
