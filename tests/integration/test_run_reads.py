"""Coalesced run reads (``GET /v1/runs/{id}``) against real Postgres: one query for
a burst of readers of several tenants, each reader its own run and nothing of
another tenant's, and failures, timeouts and cancellations confined to the
reads they concern.

The queries are watched (and, where a test needs a burst to queue, held) at the
pool: ``ReadQueries`` wraps the pool the reads are given and passes each
statement on to Postgres unchanged. This module's replica reaches Postgres
through a ``TcpProxy``, which one test cuts mid-batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from dpp.adapters.failures import unavailable_dependency
from dpp.adapters.postgres import Pool
from dpp.app import Runtime
from dpp.runs import reads as reads_module
from dpp.runs import store as store_module
from dpp.runs.reads import RunReads, RunReadsStatistics
from dpp.runs.settled import SettledRuns
from tests.integration.test_operator_metrics import scrape, value
from tests.integration.test_runs_api import ECHO, _tenant
from tests.tcp_proxy import TcpProxy, proxy_to

POLL_S = 0.002
ANSWER_TIMEOUT_S = 10.0  # a read left unanswered fails its test instead of hanging it
IDLE = RunReadsStatistics(in_flight=False, reads_queued=0)
UNKNOWN_RUN = "run_00000000000000000000000000"
WIDE_PLAN = {
    "id": "wide",
    "requests_per_minute": 10_000,
    "max_concurrent_runs": 1_000,
    "retention_days": 30,
}


class ReadQueries:
    """The run reads' statements as they reach the pool: ``sizes`` holds each
    one's number of (tenant, run id) pairs, in order; a statement whose index is
    held waits for ``release(index)`` (its connection taken) before it goes to
    Postgres. ``after_release`` runs once a connection is back in the pool."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.readers: list[RunReads] = []
        self.after_release: Callable[[], None] | None = None
        self._gates: dict[int, asyncio.Event] = {}

    def pool(self, pool: Pool) -> Pool:
        return cast(Pool, _WatchedPool(pool, self))

    def hold(self, index: int) -> None:
        self._gates[index] = asyncio.Event()

    def release(self, index: int) -> None:
        self._gates[index].set()

    async def fetch(self, connection: Any, query: str, *arguments: Any, **options: Any) -> Any:
        index = len(self.sizes)
        self.sizes.append(len(arguments[1]))
        gate = self._gates.get(index)
        if gate is not None:
            await gate.wait()
        return await connection.fetch(query, *arguments, **options)

    async def fetchrow(self, connection: Any, query: str, *arguments: Any, **options: Any) -> Any:
        """A lone read's primary-key lookup: one pair."""
        index = len(self.sizes)
        self.sizes.append(1)
        gate = self._gates.get(index)
        if gate is not None:
            await gate.wait()
        return await connection.fetchrow(query, *arguments, **options)

    async def wait_queries(self, count: int) -> None:
        await until(lambda: len(self.sizes) >= count)

    def queued(self) -> int:
        return sum(reader.statistics().reads_queued for reader in self.readers)


class _WatchedPool:
    def __init__(self, pool: Pool, watch: ReadQueries) -> None:
        self._pool = pool
        self._watch = watch

    def acquire(self, *, timeout: float) -> _Acquired:
        return _Acquired(self._pool.acquire(timeout=timeout), self._watch)


class _Acquired:
    def __init__(self, acquiring: Any, watch: ReadQueries) -> None:
        self._acquiring = acquiring
        self._watch = watch

    async def __aenter__(self) -> _WatchedConnection:
        return _WatchedConnection(await self._acquiring.__aenter__(), self._watch)

    async def __aexit__(
        self,
        error_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._acquiring.__aexit__(error_type, error, traceback)
        if self._watch.after_release is not None:
            self._watch.after_release()


class _WatchedConnection:
    def __init__(self, connection: Any, watch: ReadQueries) -> None:
        self._connection = connection
        self._watch = watch

    async def fetch(self, query: str, *arguments: Any, **options: Any) -> Any:
        return await self._watch.fetch(self._connection, query, *arguments, **options)

    async def fetchrow(self, query: str, *arguments: Any, **options: Any) -> Any:
        return await self._watch.fetchrow(self._connection, query, *arguments, **options)


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / POLL_S)):
        if condition():
            return
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"not so within {timeout_s} s")


async def answers(*calls: Awaitable[Any]) -> list[Any]:
    async with asyncio.timeout(ANSWER_TIMEOUT_S):
        return list(await asyncio.gather(*calls, return_exceptions=True))


@pytest.fixture
def watch(monkeypatch: pytest.MonkeyPatch) -> ReadQueries:
    """Every ``RunReads`` the replica builds reads through a watched pool."""
    watched = ReadQueries()

    def reads(pool: Pool, queries: Any, **options: Any) -> RunReads:
        reader = RunReads(watched.pool(pool), queries, **options)
        watched.readers.append(reader)
        return reader

    monkeypatch.setattr(store_module, "RunReads", reads)
    return watched


@pytest.fixture
def runtime(watch: ReadQueries, runtime: Runtime) -> Runtime:
    """The replica, built after ``watch`` is in place."""
    return runtime


async def _wide_tenant(
    http: httpx.AsyncClient, admin_headers: dict[str, str]
) -> tuple[str, dict[str, str]]:
    """A tenant (its id and bearer header) on a plan no burst here can exceed."""
    created = await http.post("/admin/plans", json=WIDE_PLAN, headers=admin_headers)
    assert created.status_code in (201, 409), created.text  # 409: made for an earlier tenant
    tenant_id, key = await _tenant(http, admin_headers, 1_000_000, plan_id="wide")
    return str(tenant_id), key


async def _runs(http: httpx.AsyncClient, key: dict[str, str], count: int) -> list[str]:
    ids = []
    for _ in range(count):
        submitted = await http.post("/v1/runs", json=ECHO, headers=key)
        assert submitted.status_code == 202, submitted.text
        ids.append(submitted.json()["id"])
    return ids


def _without_request_id(response: httpx.Response) -> bytes:
    request_id = response.headers["x-request-id"]
    return response.content.replace(request_id.encode(), b"<request-id>")


# --- over HTTP, on the full replica -------------------------------------------------------


async def test_a_burst_of_two_tenants_gets_each_its_own_runs_in_one_query(
    http: httpx.AsyncClient, admin_headers: dict[str, str], watch: ReadQueries
) -> None:
    """The owner's read and a stranger's read of the same run in one query: the
    owner gets it, the stranger the 404 of an unknown id, byte for byte."""
    (_, one), (_, two) = (
        await _wide_tenant(http, admin_headers),
        await _wide_tenant(http, admin_headers),
    )
    ones, twos = await _runs(http, one, 3), await _runs(http, two, 3)
    reads = [(one, run_id) for run_id in ones * 2] + [(two, run_id) for run_id in twos * 2]
    reads += [(two, run_id) for run_id in ones] + [(one, run_id) for run_id in twos]
    reads += [(one, UNKNOWN_RUN), (two, UNKNOWN_RUN)]
    expected = [200] * 12 + [404] * 8

    first = len(watch.sizes)
    watch.hold(first)
    leader = asyncio.ensure_future(http.get(f"/v1/runs/{ones[0]}", headers=one))
    await watch.wait_queries(first + 1)
    burst = [asyncio.ensure_future(http.get(f"/v1/runs/{r}", headers=k)) for k, r in reads]
    await until(lambda: watch.queued() == len(reads))
    watch.release(first)
    responses = await answers(leader, *burst)

    assert watch.sizes[first:] == [1, len(reads)]  # the leader's query, then one for the rest
    assert responses[0].status_code == 200 and responses[0].json()["id"] == ones[0]
    got = responses[1:]
    assert [response.status_code for response in got] == expected
    for (_, run_id), response in zip(reads[:12], got[:12], strict=True):
        assert response.json()["id"] == run_id
        assert response.headers["x-dpp-cost-reserved"] == str(
            response.json()["reserved_usd_micros"]
        )
    unknown = _without_request_id(got[-1])
    assert all(_without_request_id(response) == unknown for response in got[12:])
    assert all(reader.statistics() == IDLE for reader in watch.readers)


async def test_concurrent_gets_share_queries_and_a_lone_get_makes_one(
    http: httpx.AsyncClient, admin_headers: dict[str, str], watch: ReadQueries
) -> None:
    _, key = await _wide_tenant(http, admin_headers)
    run_ids = await _runs(http, key, 4)
    first = len(watch.sizes)
    lone = await http.get(f"/v1/runs/{run_ids[0]}", headers=key)
    assert lone.status_code == 200
    assert watch.sizes[first:] == [1]

    first = len(watch.sizes)
    responses = await answers(
        *(http.get(f"/v1/runs/{run_ids[i % 4]}", headers=key) for i in range(64))
    )
    assert [response.json()["id"] for response in responses] == [run_ids[i % 4] for i in range(64)]
    sizes = watch.sizes[first:]
    assert sum(sizes) == 64 and len(sizes) < 64, sizes


# --- Postgres down ------------------------------------------------------------------------


def _through(url: str, proxy: TcpProxy) -> str:
    parts = urlsplit(url)
    credentials = parts.netloc.rsplit("@", 1)
    netloc = proxy.address if len(credentials) == 1 else f"{credentials[0]}@{proxy.address}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@pytest.fixture
async def postgres_proxy(database_url: str) -> AsyncIterator[TcpProxy]:
    async with proxy_to(database_url) as proxy:
        yield proxy


@pytest.fixture
def settings_env(settings_env: dict[str, str], postgres_proxy: TcpProxy) -> dict[str, str]:
    """This module's replica reaches Postgres through the proxy."""
    return {**settings_env, "DATABASE_URL": _through(settings_env["DATABASE_URL"], postgres_proxy)}


async def test_postgres_down_answers_the_batch_503_and_the_next_batch_works(
    http: httpx.AsyncClient,
    admin_headers: dict[str, str],
    watch: ReadQueries,
    postgres_proxy: TcpProxy,
) -> None:
    _, key = await _wide_tenant(http, admin_headers)
    (run_id,) = await _runs(http, key, 1)
    assert (await http.get(f"/v1/runs/{run_id}", headers=key)).status_code == 200  # key cached

    first = len(watch.sizes)
    watch.hold(first)
    leader = asyncio.ensure_future(http.get(f"/v1/runs/{run_id}", headers=key))
    await watch.wait_queries(first + 1)
    burst = [asyncio.ensure_future(http.get(f"/v1/runs/{run_id}", headers=key)) for _ in range(9)]
    await until(lambda: watch.queued() == 9)
    await postgres_proxy.cut()
    watch.release(first)
    responses = await answers(leader, *burst)
    # the leader's statement meets the reset; the batch of 9 behind it, the refusal
    # of a new connection at the pool's acquire (no statement)
    assert watch.sizes[first:] == [1]
    for response in responses:
        assert response.status_code == 503, response.text
        assert response.json()["dependency"] == "postgres"
        assert int(response.headers["retry-after"]) >= 1
    assert all(reader.statistics() == IDLE for reader in watch.readers)

    await postgres_proxy.restore()
    for _ in range(75):  # the pool reconnects within 15 s
        if (await http.get(f"/v1/runs/{run_id}", headers=key)).status_code == 200:
            break
        await asyncio.sleep(0.2)
    responses = await answers(*(http.get(f"/v1/runs/{run_id}", headers=key) for _ in range(10)))
    assert [response.status_code for response in responses] == [200] * 10


# --- the reads themselves, on a pool of the test's own -------------------------------------


@pytest.fixture
async def owned(http: httpx.AsyncClient, admin_headers: dict[str, str]) -> tuple[str, list[str]]:
    """A tenant and three of its runs (and another tenant with one)."""
    owner, key = await _wide_tenant(http, admin_headers)
    ids = await _runs(http, key, 3)
    _, stranger = await _wide_tenant(http, admin_headers)
    await _runs(http, stranger, 1)
    return owner, ids


async def test_a_lone_read_makes_one_query_with_the_rows_columns(
    runtime: Runtime, owned: tuple[str, list[str]]
) -> None:
    watch = ReadQueries()
    reads = RunReads(watch.pool(runtime.adapters.pool), runtime.adapters.queries)
    owner, (run_id, *_) = owned
    row = await reads.owned(owner, run_id)
    assert row is not None and row["id"] == run_id
    assert watch.sizes == [1]
    columns = await runtime.adapters.pool.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'runs'"
    )
    assert set(row.keys()) == {c["column_name"] for c in columns}
    assert await reads.owned(owner, UNKNOWN_RUN) is None
    assert watch.sizes == [1, 1]
    assert reads.statistics() == IDLE


async def test_the_query_itself_matches_the_tenant(
    runtime: Runtime, owned: tuple[str, list[str]]
) -> None:
    """The SQL's own guard: a stranger's pair is no row, even where the Python
    side would not have matched it either."""
    owner, (run_id, *_) = owned
    query = runtime.adapters.queries["owned_runs"]
    pool = runtime.adapters.pool
    assert await pool.fetch(query, ["ten_00000000000000000000000000"], [run_id]) == []
    rows = await pool.fetch(query, [owner, owner], [run_id, run_id])
    assert [row["id"] for row in rows] == [run_id]
    # and a lone read's lookup
    lone = runtime.adapters.queries["owned_run"]
    assert await pool.fetchrow(lone, run_id, "ten_00000000000000000000000000") is None
    found = await pool.fetchrow(lone, run_id, owner)
    assert found is not None and found["id"] == run_id


async def test_a_queue_longer_than_the_cap_goes_in_several_queries(
    runtime: Runtime, owned: tuple[str, list[str]]
) -> None:
    watch = ReadQueries()
    reads = RunReads(watch.pool(runtime.adapters.pool), runtime.adapters.queries, batch_max=4)
    owner, ids = owned
    watch.hold(0)
    leader = asyncio.ensure_future(reads.owned(owner, ids[0]))
    await watch.wait_queries(1)
    queued = [asyncio.ensure_future(reads.owned(owner, ids[i % 3])) for i in range(11)]
    await until(lambda: reads.statistics().reads_queued == 11)
    watch.release(0)
    rows = await answers(leader, *queued)
    assert watch.sizes == [1, 4, 4, 3]
    assert [row["id"] for row in rows] == [ids[0]] + [ids[i % 3] for i in range(11)]
    assert reads.statistics() == IDLE


async def test_a_cancelled_leader_or_queued_reader_leaves_the_rest_answered(
    runtime: Runtime, owned: tuple[str, list[str]]
) -> None:
    watch = ReadQueries()
    reads = RunReads(watch.pool(runtime.adapters.pool), runtime.adapters.queries)
    owner, ids = owned
    watch.hold(0)
    leader = asyncio.ensure_future(reads.owned(owner, ids[0]))
    await watch.wait_queries(1)
    queued = [asyncio.ensure_future(reads.owned(owner, run_id)) for run_id in ids]
    await until(lambda: reads.statistics().reads_queued == 3)
    queued[1].cancel()  # its client went while it queued: dropped from the batch
    leader.cancel()  # the leader's client went mid-query: the queue goes all the same
    outcomes = await answers(leader, *queued)
    assert isinstance(outcomes[0], asyncio.CancelledError)
    assert isinstance(outcomes[2], asyncio.CancelledError)
    assert [outcomes[1]["id"], outcomes[3]["id"]] == [ids[0], ids[2]]
    assert watch.sizes == [1, 2]
    assert reads.statistics() == IDLE
    row = await reads.owned(owner, ids[1])  # nothing left stuck "in flight"
    assert row is not None and row["id"] == ids[1]


async def test_a_reader_told_to_lead_whose_client_went_hands_over(
    runtime: Runtime, owned: tuple[str, list[str]]
) -> None:
    """Alone behind the query that returned, it is told to lead; its task is
    cancelled before it runs: the reads stay usable (nothing left in flight)."""
    watch = ReadQueries()
    reads = RunReads(watch.pool(runtime.adapters.pool), runtime.adapters.queries)
    owner, ids = owned
    watch.hold(0)
    leader = asyncio.ensure_future(reads.owned(owner, ids[0]))
    await watch.wait_queries(1)
    alone = asyncio.ensure_future(reads.owned(owner, ids[1]))
    await until(lambda: reads.statistics().reads_queued == 1)
    loop = asyncio.get_running_loop()

    def cancel_alone() -> None:
        # the leader's connection is back: its hand-over, in the same step, tells
        # ``alone`` to lead; this cancel is queued before that wake-up
        loop.call_soon(alone.cancel)

    watch.after_release = cancel_alone
    watch.release(0)
    outcomes = await answers(leader, alone)
    watch.after_release = None
    assert outcomes[0]["id"] == ids[0]
    assert isinstance(outcomes[1], asyncio.CancelledError)
    assert watch.sizes == [1]  # it never made its query
    assert reads.statistics() == IDLE
    async with asyncio.timeout(ANSWER_TIMEOUT_S):
        row = await reads.owned(owner, ids[2])
    assert row is not None and row["id"] == ids[2]


async def test_a_batch_past_its_deadline_fails_as_postgres_and_the_next_read_works(
    runtime: Runtime, owned: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Postgres too slow (the runs table locked): the leader's statement times out
    at its deadline, and the reads queued behind it at theirs, which passed while
    they queued (one deadline per batch: its earliest reader's)."""
    monkeypatch.setattr(reads_module, "READ_TIMEOUT_S", 0.3)
    watch = ReadQueries()
    reads = RunReads(watch.pool(runtime.adapters.pool), runtime.adapters.queries)
    owner, ids = owned
    async with runtime.adapters.pool.acquire() as locker:
        transaction = locker.transaction()
        await transaction.start()
        await locker.execute("LOCK TABLE runs IN ACCESS EXCLUSIVE MODE")
        try:
            leader = asyncio.ensure_future(reads.owned(owner, ids[0]))
            await watch.wait_queries(1)
            queued = [asyncio.ensure_future(reads.owned(owner, run_id)) for run_id in ids]
            await until(lambda: reads.statistics().reads_queued == 3)
            outcomes = await answers(leader, *queued)
        finally:
            await transaction.rollback()
    assert watch.sizes[0] == 1 and len(watch.sizes) <= 2
    for outcome in outcomes:
        assert isinstance(outcome, TimeoutError), outcome
        assert unavailable_dependency(outcome) == "postgres"  # the front's 503
    assert reads.statistics() == IDLE
    row = await reads.owned(owner, ids[1])
    assert row is not None and row["id"] == ids[1]


# --- settled runs: read from Postgres once, then from memory (dpp.runs.settled) ----------


async def _settled_reads(runtime: Runtime) -> float:
    return value(await scrape(runtime.context), "dpp_settled_run_reads_total")


async def test_a_settled_run_is_read_from_postgres_once_then_from_memory(
    http: httpx.AsyncClient, admin_headers: dict[str, str], watch: ReadQueries, runtime: Runtime
) -> None:
    """A QUEUED run is read from Postgres every time (its reader sees each change);
    once it is settled, its reads cost no query and answer what Postgres answers,
    byte for byte; another tenant still gets the 404 of an unknown id."""
    _, key = await _wide_tenant(http, admin_headers)
    _, stranger = await _wide_tenant(http, admin_headers)
    (run_id,) = await _runs(http, key, 1)
    path = f"/v1/runs/{run_id}"

    before = len(watch.sizes)
    for _ in range(2):
        queued = await http.get(path, headers=key)
        assert queued.json()["status"] == "QUEUED"
    assert len(watch.sizes) == before + 2

    canceled = await http.post(f"{path}/cancel", headers=key)
    assert canceled.status_code == 200, canceled.text
    assert canceled.json()["status"] == "CANCELED"  # the cancel's re-read saw it at once
    hits = await _settled_reads(runtime)
    settled = len(watch.sizes)
    from_memory = [await http.get(path, headers=key) for _ in range(3)]
    assert len(watch.sizes) == settled, "a settled run's reads went to Postgres"
    assert await _settled_reads(runtime) == hits + 3
    assert {_without_request_id(response) for response in from_memory} == {
        _without_request_id(from_memory[0])
    }
    assert from_memory[0].json()["status"] == "CANCELED"

    # the same read served by Postgres: a replica that never read it (its cache
    # emptied here) answers the same bytes and headers
    runtime.context.runs._store._settled = SettledRuns()  # type: ignore[attr-defined]
    from_postgres = await http.get(path, headers=key)
    assert len(watch.sizes) == settled + 1
    assert _without_request_id(from_postgres) == _without_request_id(from_memory[0])
    assert {
        name: value
        for name, value in from_postgres.headers.items()
        if name.startswith("x-dpp-cost")
    } == {
        name: value
        for name, value in from_memory[0].headers.items()
        if name.startswith("x-dpp-cost")
    }

    # another tenant's read of it: not from memory, and a 404 like an unknown id
    foreign = await http.get(path, headers=stranger)
    unknown = await http.get(f"/v1/runs/{UNKNOWN_RUN}", headers=stranger)
    assert foreign.status_code == unknown.status_code == 404
    assert _without_request_id(foreign) == _without_request_id(unknown)
    assert len(watch.sizes) == settled + 3
