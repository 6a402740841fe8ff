"""The Postgres queue backend (the default): the run row is the queue entry.

Claiming is ``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED)`` so
replicas never wait on each other. Enqueueing is a ``NOTIFY`` that wakes every
replica's dispatcher at once; a dedicated connection LISTENs, reconnecting
when it is lost. Notifications are only a latency optimisation: the
dispatcher also polls, so a lost NOTIFY delays a run, never strands it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import anyio
import asyncpg
from anyio.abc import TaskStatus

from dpp.adapters.postgres import Queries
from dpp.adapters.queue.base import (
    ClaimedRun,
    DeadLetter,
    QueuedRun,
    claim_guarded,
    claimed_from_row,
    release_claimed,
)
from dpp.limits import CLAIM_BATCH_MAX

log = logging.getLogger("dpp.adapters.queue.postgres")

CHANNEL = "dpp_runs_queued"
# How often the LISTEN connection is probed: a silently dead connection
# would otherwise only cost latency until the poll, but we want it back.
LISTEN_PROBE_S = 5.0
LISTEN_PROBE_TIMEOUT_S = 3.0
RECONNECT_BACKOFF_FIRST_S = 0.2
RECONNECT_BACKOFF_MAX_S = 5.0


class PostgresQueue:
    backend = "postgres"
    claim_waits = False

    def __init__(self, pool: asyncpg.Pool, queries: Queries, *, dsn: str, lease_sec: int) -> None:
        assert lease_sec >= 1
        self._pool = pool
        self._queries = queries
        self._dsn = dsn
        self.lease_sec = lease_sec
        self.listening = False  # the LISTEN connection is up (statistics, tests)
        # Group NOTIFY: a caller asking while one is in flight shares the next.
        self._notify_lock: anyio.Lock | None = None
        self._notifies_asked = 0
        self._notifies_covered = 0
        # set while the announcer runs (beside ``listen``): enqueue asks it
        self._announce_wanted: anyio.Event | None = None

    async def enqueue(self, runs: Sequence[QueuedRun]) -> None:
        """Announce committed runs: one NOTIFY for every caller that asked before
        it was sent.

        While this replica listens (``listen`` runs, under the dispatcher), its
        announcer task sends the NOTIFY and the caller returns at once: a
        submit's answer does not wait for a round trip that only saves other
        replicas' dispatchers a poll. Otherwise the caller sends it, queueing
        behind the one in flight so that the next covers everyone who asked
        meanwhile (at most two round trips per burst). Either way a NOTIFY is
        sent after each caller asked, so after its runs committed."""
        if not runs:
            return
        if self._announce_wanted is not None:
            self._announce_wanted.set()
            return
        self._notifies_asked += 1
        asked = self._notifies_asked
        if self._notify_lock is None:
            self._notify_lock = anyio.Lock()
        async with self._notify_lock:
            if self._notifies_covered >= asked:
                return
            covering = self._notifies_asked
            await self._notify()
            self._notifies_covered = covering

    async def _announce(self) -> None:
        """The announcer: a NOTIFY after each batch of ``enqueue`` calls, until
        cancelled. A lost one delays runs until a poll; it never strands them."""
        self._announce_wanted = anyio.Event()
        try:
            while True:
                await self._announce_wanted.wait()
                # asked from now on: covered by the next NOTIFY, not this one
                self._announce_wanted = anyio.Event()
                try:
                    await self._notify()
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    log.debug("announcing queued runs failed; the poll finds them")
                    await anyio.sleep(RECONNECT_BACKOFF_FIRST_S)
        finally:
            self._announce_wanted = None

    async def _notify(self) -> None:
        await self._pool.execute("SELECT pg_notify($1, '')", CHANNEL)

    async def claim_batch(self, n: int) -> list[ClaimedRun]:
        assert 1 <= n <= CLAIM_BATCH_MAX, n
        rows = await claim_guarded(
            self._pool, self._queries["claim_queued_runs"], n, self.lease_sec
        )
        assert len(rows) <= n
        return [claimed_from_row(row) for row in rows]

    async def extend_visibility(self, run: ClaimedRun, visibility_sec: int) -> None:
        """Nothing to extend: the lease on the row is all there is."""

    async def ack(self, run: ClaimedRun) -> None:
        """Nothing to forget: the row's status already says the run left the queue."""

    async def release(self, run: ClaimedRun) -> bool:
        released = await release_claimed(self._pool, self._queries, run)
        if released:
            # Best effort: another replica may take it now rather than at its poll.
            try:
                with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                    await self._notify()
            except (OSError, asyncpg.PostgresError):
                log.debug("notify after release failed; the poll finds the run")
        return released

    async def requeue_unsent(self, older_than_sec: int) -> int:
        """Never needed: a committed QUEUED row is already claimable."""
        return 0

    async def receive_dead_letters(self, n: int) -> list[DeadLetter]:
        """No dead letters: a run row cannot fail delivery."""
        return []

    async def delete_dead_letter(self, letter: DeadLetter) -> None:
        raise AssertionError("the postgres queue hands out no dead letters")

    async def ping(self) -> None:
        await self._pool.fetchval("SELECT 1")

    async def listen(
        self, wake: Callable[[], None], *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """LISTEN on a connection of its own, reconnecting with backoff, and
        announce this replica's admissions (``enqueue``), until cancelled.

        Reports started once the first connection listens, or after the first
        failed attempt (the poll covers for it meanwhile: starting must not
        hang on an outage).
        """
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._announce)
            await tasks.start(self._listen, wake)
            task_status.started()

    async def _listen(
        self, wake: Callable[[], None], *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        started = False
        backoff_s = RECONNECT_BACKOFF_FIRST_S

        def on_notify(connection: object, pid: int, channel: str, payload: object) -> None:
            wake()

        while True:
            connection: asyncpg.Connection | None = None
            try:
                connection = await asyncpg.connect(self._dsn)
                await connection.add_listener(CHANNEL, on_notify)
                self.listening = True
                backoff_s = RECONNECT_BACKOFF_FIRST_S
                # Whatever was notified while we were not listening.
                wake()
                if not started:
                    started = True
                    task_status.started()
                while True:
                    await anyio.sleep(LISTEN_PROBE_S)
                    with anyio.fail_after(LISTEN_PROBE_TIMEOUT_S):
                        await connection.fetchval("SELECT 1")
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
                log.warning(
                    "queue listener lost its connection; reconnecting",
                    extra={"error": type(error).__name__, "backoff_s": backoff_s},
                )
            finally:
                self.listening = False
                if connection is not None:
                    # terminate(): no round trip, so it works on a dead socket too
                    connection.terminate()
            if not started:
                started = True
                task_status.started()
            await anyio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, RECONNECT_BACKOFF_MAX_S)
