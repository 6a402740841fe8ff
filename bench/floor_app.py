"""The floor: DPP's per-run work on DPP's stack, with none of DPP's guarantees.

A yardstick for ``bench/bench_ratios.py --floor``. ``bare_app.py`` answers
without doing anything, so DPP/bare mixes two costs: what any server that
accepts, stores and executes runs durably must pay on this stack, and what
DPP's guarantees add on top. This app pays only the first. Per run it does
the minimum DPP's design has to do, on the same pieces (hypercorn configured
as ``dpp serve`` configures it, starlette, orjson, asyncpg, redis-py asyncio,
one process on asyncio):

  - POST /v1/runs       parses the JSON body; one Redis script call (INCR +
                        PEXPIRE of one counter: where DPP checks the rate
                        limit); then joins a group commit: one statement per
                        batch inserts every row of the batch with one
                        ``unnest`` and notifies the executor, committing
                        itself (one transaction, one round trip, one WAL
                        flush); up to four batches in flight, as DPP's writers
                        allow; requests arriving while every slot commits go
                        in the next batch. 202 once its batch is durable.
  - GET  /v1/runs/{id}  one Redis script call (the same) and one primary-key
                        SELECT; 200 with the row, 404 if absent.
  - in-process execution: one loop claims up to 64 QUEUED rows in one
                        statement, writes their results under ``--results-dir``
                        in one worker-thread call (each to a temporary file,
                        fsynced, renamed; the directory fsynced once: durable
                        as DPP's local results store makes them), then marks
                        them COMPLETED in one statement. It wakes on the NOTIFY
                        each submit batch sends (LISTEN on its own connection),
                        polling once a second in case one is missed.

What it leaves out, on purpose: authentication and API keys, validation of
the body or the pack, budgets, reservations and settlements, the ledger and
its rules, idempotency keys, leases and reclaiming a crashed run, per-tenant
anything (one tenant, one rate-limit counter that never refuses), logging,
tracing, download links. Nothing here is safe to run as a service; it exists
to say how fast a server on this stack gets when it keeps only durability.

``bench_ratios.py --floor`` starts it beside the bare app and ``dpp serve``,
in its own database (the app creates its table), Redis prefix and results
directory, loads all three in the same rounds and prints floor, floor/bare
and DPP/floor beside DPP/bare. For the submit and echo rows the floor
bounds what DPP can reach against bare on this stack; for reads it does not
(DPP answers a burst of reads with one query, the floor reads per request).

    .venv/bin/python bench/floor_app.py --port 8002 \\
        --database-url postgresql://postgres@127.0.0.1:5432/floor \\
        --results-dir /tmp/floor-results
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from bare_app import hypercorn_config  # bench/, beside this script
from hypercorn.asyncio import serve
from redis.asyncio import BlockingConnectionPool, Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

TENANT = "ten_floor"
CHANNEL = "floor_runs"
POOL_SIZE = 8  # Postgres connections: submits, reads and the executor share them
REDIS_CONNECTIONS_MAX = 64  # as dpp.adapters.redis
BATCH_MAX = 256  # rows per submit transaction
BATCHES_MAX = 4  # submit transactions in flight at once
CLAIM_MAX = 64  # runs claimed (and their results written) per executor step
POLL_S = 1.0  # the executor's wait for a NOTIFY before it looks anyway
RATE_WINDOW_MS = 60_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS floor_runs (
    id text PRIMARY KEY,
    tenant_id text NOT NULL,
    status text NOT NULL,
    inputs jsonb NOT NULL,
    created_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS floor_runs_queued ON floor_runs (created_at) WHERE status = 'QUEUED';
"""
# One statement, so one transaction that commits itself: the rows, then the
# executor's wake-up (delivered at commit).
INSERT = f"""
WITH inserted AS (
    INSERT INTO floor_runs (id, tenant_id, status, inputs, created_at)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::timestamptz[])
    RETURNING 1
)
SELECT pg_notify('{CHANNEL}', count(*)::text) FROM inserted
"""
CLAIM = f"""
UPDATE floor_runs SET status = 'PROCESSING'
WHERE id IN (
    SELECT id FROM floor_runs WHERE status = 'QUEUED'
    ORDER BY created_at LIMIT {CLAIM_MAX} FOR UPDATE SKIP LOCKED
)
RETURNING id, inputs
"""
COMPLETE = "UPDATE floor_runs SET status = 'COMPLETED' WHERE id = ANY($1::text[])"
READ = "SELECT id, status FROM floor_runs WHERE id = $1"
# Where DPP checks a tenant's rate limit: one script call, one counter.
RATE_SCRIPT = """
local count = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return count
"""


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Release pooled connections without asyncpg's RESET ALL round trip, as DPP does."""


def _json(content: object, status_code: int) -> Response:
    return Response(orjson.dumps(content), status_code, media_type="application/json")


def _write_results(directory: Path, results: list[tuple[str, bytes]]) -> None:
    """Each result durable under its own name (temporary file, fsync, rename),
    then the directory fsynced once for the batch's renames. Blocking: one
    worker-thread call per batch."""
    for run_id, body in results:
        temporary = directory / f".tmp-{run_id}"
        with temporary.open("wb") as file:
            file.write(body)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, directory / f"{run_id}.json")
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@dataclass(slots=True)
class _Draft:
    """A submitted run waiting for its batch to commit."""

    run_id: str
    inputs: str  # JSON text
    created_at: datetime
    committed: asyncio.Future[None]


@dataclass
class Floor:
    database_url: str
    redis_url: str
    redis_prefix: str
    results_dir: Path
    pool: asyncpg.Pool = field(init=False)
    rate_script: Any = field(init=False)  # redis-py's AsyncScript
    # group commit of submits: drafts waiting while every slot commits
    queue: list[_Draft] = field(default_factory=list)
    committing: int = 0  # slots whose batches are being committed
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def check_rate(self) -> None:
        await self.rate_script(keys=[f"{self.redis_prefix}:floor:rate"], args=[RATE_WINDOW_MS])

    async def insert(self, run_id: str, inputs: str) -> None:
        """Return once the run's row is committed, in whichever batch took it."""
        committed = asyncio.get_running_loop().create_future()
        self.queue.append(_Draft(run_id, inputs, datetime.now(UTC), committed))
        if self.committing < BATCHES_MAX:
            self.committing += 1
            task = asyncio.create_task(self._commit_batches())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        await committed

    async def _commit_batches(self) -> None:
        """One slot: commit what is queued, one batch at a time, until nothing is."""
        try:
            while self.queue:
                batch = self.queue[:BATCH_MAX]
                del self.queue[: len(batch)]
                try:
                    await self.pool.execute(
                        INSERT,
                        [draft.run_id for draft in batch],
                        [TENANT] * len(batch),
                        ["QUEUED"] * len(batch),
                        [draft.inputs for draft in batch],
                        [draft.created_at for draft in batch],
                    )
                except Exception as error:  # each waiting request answers it
                    for draft in batch:
                        if not draft.committed.done():
                            draft.committed.set_exception(error)
                else:
                    for draft in batch:
                        if not draft.committed.done():
                            draft.committed.set_result(None)
        finally:
            self.committing -= 1

    async def execute(self, listener: asyncpg.Connection) -> None:
        """Claim, write the results, complete; wait for a NOTIFY when idle."""
        wake = asyncio.Event()
        await listener.add_listener(CHANNEL, lambda *_: wake.set())
        while True:
            wake.clear()  # before the claim: a NOTIFY during it is not lost
            claimed = await self.pool.fetch(CLAIM)
            if not claimed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), POLL_S)
                continue
            results = [
                (
                    row["id"],
                    orjson.dumps({"id": row["id"], "output": orjson.Fragment(row["inputs"])}),
                )
                for row in claimed
            ]
            await asyncio.to_thread(_write_results, self.results_dir, results)
            await self.pool.execute(COMPLETE, [row["id"] for row in claimed])

    async def submit(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        await self.check_rate()
        run_id = f"run_{secrets.token_hex(13)}"
        await self.insert(run_id, orjson.dumps(body.get("inputs", {})).decode())
        return _json({"id": run_id, "status": "QUEUED"}, 202)

    async def read(self, request: Request) -> Response:
        await self.check_rate()
        row = await self.pool.fetchrow(READ, request.path_params["run_id"])
        if row is None:
            return _json({"error": "not_found"}, 404)
        return _json({"id": row["id"], "status": row["status"]}, 200)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.pool = await asyncpg.create_pool(
            self.database_url, min_size=POOL_SIZE, max_size=POOL_SIZE, reset=_keep_session
        )
        await self.pool.execute(SCHEMA)
        listener = await asyncpg.connect(self.database_url)
        redis = Redis(
            connection_pool=BlockingConnectionPool.from_url(
                self.redis_url, max_connections=REDIS_CONNECTIONS_MAX
            )
        )
        self.rate_script = redis.register_script(RATE_SCRIPT)
        executor = asyncio.create_task(self.execute(listener))
        try:
            yield
        finally:
            executor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await executor
            await listener.close()
            await self.pool.close()
            await redis.aclose()

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/runs", self.submit, methods=["POST"]),
                Route("/v1/runs/{run_id}", self.read, methods=["GET"]),
            ],
            lifespan=self.lifespan,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--database-url", required=True, help="its table is created there")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--redis-prefix", default="floor", help="its one key: PREFIX:floor:rate")
    parser.add_argument("--results-dir", type=Path, required=True)
    arguments = parser.parse_args()
    floor = Floor(
        arguments.database_url, arguments.redis_url, arguments.redis_prefix, arguments.results_dir
    )
    config = hypercorn_config(arguments.host, arguments.port)
    asyncio.run(serve(floor.app(), config))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
