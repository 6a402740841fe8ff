"""The SQS queue backend (aiobotocore): one message per run, Postgres decides.

- ``enqueue`` sends ``{"run_id", "tenant_id", "pack_type", "enqueued_at",
  "schema_version": 1, "trace_id"}`` after the run committed QUEUED, then
  stamps ``runs.enqueued_at``; a crash in between leaves the stamp NULL and
  the reconciler's backstop (``requeue_unsent``) sends the run again. The
  same backstop sends again a run still QUEUED ``message_lost_after_sec``
  after its message was sent: a message lost to retention, a purge or an
  expired dead-letter queue would otherwise hold its reservation forever.
- ``claim_batch`` long-polls, then claims each named run with the same
  guarded UPDATE as the Postgres backend (by id, only if QUEUED). A message
  whose run is terminal, claimed elsewhere or unknown is deleted unworked:
  duplicates are harmless by construction. Once messages are received, the
  claims run shielded from cancellation within one deadline: a shutdown
  never abandons a run this call claimed (it would sit PROCESSING until the
  reaper charged the minimum fee for work never started).
- A claimed run's message stays in flight: its visibility is extended by the
  heartbeat and it is deleted (``ack``) once the run left PROCESSING. If this
  replica dies, the message reappears and is deleted by whoever receives it
  (the run is then PROCESSING, for the reaper).
- The queue's redrive policy is honoured: a message received
  ``maxReceiveCount`` times without being claimed or deleted (a consumer that
  keeps dying on it, a claim that keeps failing) moves to the dead-letter
  queue, found from the policy itself. The reconciler drains it
  (``receive_dead_letters``) and sets such runs aside AUDIT_REQUIRED for an
  operator (they never started: nothing is charged automatically).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
import asyncpg
import orjson
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from anyio.abc import TaskStatus

from dpp.adapters.postgres import Queries
from dpp.adapters.queue.base import (
    STATEMENT_DEADLINE_S,
    ClaimedRun,
    DeadLetter,
    QueuedRun,
    claimed_from_row,
    release_claimed,
)
from dpp.ids import is_id
from dpp.limits import CLAIM_BATCH_MAX, QUEUED_MESSAGE_LOST_AFTER_SEC

log = logging.getLogger("dpp.adapters.queue.sqs")

SEND_BATCH_MAX = 10  # SQS's own limit per SendMessageBatch / ReceiveMessage
RECEIVE_WAIT_SEC_DEFAULT = 2  # long poll; short enough that a drain is prompt
VISIBILITY_SEC_MAX = 43_200  # SQS's ceiling (12 h)
DEAD_LETTER_VISIBILITY_SEC = 60
BODY_BYTES_MAX = 4_096  # our messages are ~300 bytes; anything larger is not ours


def parse_message(body: str) -> tuple[str, str] | None:
    """(run_id, tenant_id) from a message body, or None if it is not one of ours."""
    if len(body) > BODY_BYTES_MAX:
        return None
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict) or document.get("schema_version") != 1:
        return None
    run_id, tenant_id = document.get("run_id"), document.get("tenant_id")
    if not isinstance(run_id, str) or not is_id(run_id, "run"):
        return None
    if not isinstance(tenant_id, str) or not is_id(tenant_id, "ten"):
        return None
    return run_id, tenant_id


def _visibility(seconds: int) -> int:
    return max(0, min(seconds, VISIBILITY_SEC_MAX))


class SqsQueue:
    backend = "sqs"
    claim_waits = True

    def __init__(
        self,
        client: Any,
        queue_url: str,
        pool: asyncpg.Pool,
        queries: Queries,
        *,
        lease_sec: int,
        dead_letter_url: str | None = None,
        receive_wait_sec: int = RECEIVE_WAIT_SEC_DEFAULT,
        message_lost_after_sec: int = QUEUED_MESSAGE_LOST_AFTER_SEC,
    ) -> None:
        assert lease_sec >= 1
        assert 0 <= receive_wait_sec <= 20, receive_wait_sec
        assert message_lost_after_sec >= lease_sec, "longer than a message is ever in flight"
        self.message_lost_after_sec = message_lost_after_sec
        self._client = client
        self.queue_url = queue_url
        self.dead_letter_url = dead_letter_url
        self._pool = pool
        self._queries = queries
        self.lease_sec = lease_sec
        self.receive_wait_sec = receive_wait_sec

    # ------------------------------------------------------------ enqueue

    async def enqueue(self, runs: Sequence[QueuedRun]) -> None:
        """Send one message per run; stamp ``enqueued_at`` on those SQS accepted."""
        for start in range(0, len(runs), SEND_BATCH_MAX):
            chunk = runs[start : start + SEND_BATCH_MAX]
            answer = await self._client.send_message_batch(
                QueueUrl=self.queue_url,
                Entries=[
                    {"Id": str(index), "MessageBody": orjson.dumps(run.message()).decode()}
                    for index, run in enumerate(chunk)
                ],
            )
            sent = [chunk[int(entry["Id"])].run_id for entry in answer.get("Successful", [])]
            failed = answer.get("Failed", [])
            if failed:
                # Left unstamped: the backstop sends them again.
                log.warning(
                    "sqs refused some messages",
                    extra={"failed": len(failed), "code": failed[0].get("Code")},
                )
            if sent:
                await self._pool.execute(self._queries["mark_runs_enqueued"], sent)

    async def requeue_unsent(self, older_than_sec: int, *, limit: int = 500) -> int:
        rows = await self._pool.fetch(
            self._queries["queued_runs_unsent"], older_than_sec, limit, self.message_lost_after_sec
        )
        runs = [
            QueuedRun(r["id"], r["tenant_id"], r["pack_type"], r["trace_id"], r["created_at"])
            for r in rows
        ]
        if runs:
            log.warning(
                "re-sending messages for queued runs never announced, or whose message may be lost",
                extra={"runs": len(runs)},
            )
            await self.enqueue(runs)
        return len(runs)

    # -------------------------------------------------------------- claim

    async def claim_batch(self, n: int) -> list[ClaimedRun]:
        assert 1 <= n <= CLAIM_BATCH_MAX, n
        answer = await self._client.receive_message(
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=min(n, SEND_BATCH_MAX),
            WaitTimeSeconds=self.receive_wait_sec,
            VisibilityTimeout=_visibility(self.lease_sec),
        )
        claimed: list[ClaimedRun] = []
        # Shielded: a cancellation between two messages would lose the runs
        # claimed so far. The deadline bounds a shutdown's wait; messages not
        # reached by then stay in flight and reappear (nothing claimed them).
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + STATEMENT_DEADLINE_S
            for message in answer.get("Messages", []):
                run = await self._claim_message(message)
                if run is not None:
                    claimed.append(run)
        assert len(claimed) <= n
        return claimed

    async def _claim_message(self, message: dict[str, Any]) -> ClaimedRun | None:
        handle = message["ReceiptHandle"]
        parsed = parse_message(message.get("Body", ""))
        if parsed is None:
            log.error(
                "deleting a message that names no run",
                extra={"sqs_message_id": message.get("MessageId")},
            )
            await self._delete_unworked(handle)
            return None
        run_id, _ = parsed
        try:
            with anyio.fail_after(STATEMENT_DEADLINE_S, shield=True):
                row = await self._pool.fetchrow(
                    self._queries["claim_run_by_id"], run_id, self.lease_sec
                )
        except (OSError, asyncpg.PostgresError, TimeoutError):
            # Left in flight: it reappears after the visibility timeout, and
            # after maxReceiveCount such failures the redrive policy moves it.
            log.warning(
                "could not claim a run from its message", extra={"run_id": run_id}, exc_info=True
            )
            return None
        if row is None:
            # Terminal, claimed elsewhere, or unknown: the message has done its job.
            log.debug("message for a run that is not queued", extra={"run_id": run_id})
            await self._delete_unworked(handle)
            return None
        return claimed_from_row(row, receipt_handle=handle)

    async def _delete_unworked(self, handle: str) -> None:
        """Delete a message that needs no work. A failure must not cost the batch
        the runs it already claimed: the message reappears and is deleted then."""
        try:
            await self._delete(self.queue_url, handle)
        except Exception:
            log.warning("could not delete a spare message; it will reappear", exc_info=True)

    # ---------------------------------------------------------- in flight

    async def extend_visibility(self, run: ClaimedRun, visibility_sec: int) -> None:
        assert run.receipt_handle is not None
        await self._client.change_message_visibility(
            QueueUrl=self.queue_url,
            ReceiptHandle=run.receipt_handle,
            VisibilityTimeout=_visibility(visibility_sec),
        )

    async def ack(self, run: ClaimedRun) -> None:
        assert run.receipt_handle is not None
        await self._delete(self.queue_url, run.receipt_handle)

    async def release(self, run: ClaimedRun) -> bool:
        """QUEUED again, announced by a fresh message (its receive count starts at
        zero: a shutdown is not a delivery failure), then the old one deleted."""
        assert run.receipt_handle is not None
        released = await release_claimed(self._pool, self._queries, run)
        with anyio.CancelScope(shield=True), anyio.move_on_after(STATEMENT_DEADLINE_S):
            try:
                if released:
                    again = QueuedRun(
                        run.run_id, run.tenant_id, run.pack_type, run.trace_id, datetime.now(UTC)
                    )
                    await self.enqueue([again])
                await self._delete(self.queue_url, run.receipt_handle)
            except Exception:
                # release_run cleared enqueued_at: the backstop announces the run.
                log.warning(
                    "could not re-announce a released run",
                    extra={"run_id": run.run_id},
                    exc_info=True,
                )
        return released

    async def _delete(self, queue_url: str, receipt_handle: str) -> None:
        await self._client.delete_message(QueueUrl=queue_url, ReceiptHandle=receipt_handle)

    # -------------------------------------------------------- dead letters

    async def receive_dead_letters(self, n: int) -> list[DeadLetter]:
        """Up to ``n`` messages from the dead-letter queue (none without one)."""
        if self.dead_letter_url is None:
            return []
        answer = await self._client.receive_message(
            QueueUrl=self.dead_letter_url,
            MaxNumberOfMessages=max(1, min(n, SEND_BATCH_MAX)),
            WaitTimeSeconds=0,
            VisibilityTimeout=DEAD_LETTER_VISIBILITY_SEC,
        )
        letters = []
        for message in answer.get("Messages", []):
            parsed = parse_message(message.get("Body", ""))
            run_id = parsed[0] if parsed is not None else None
            letters.append(DeadLetter(message["ReceiptHandle"], run_id))
        return letters

    async def delete_dead_letter(self, letter: DeadLetter) -> None:
        assert self.dead_letter_url is not None
        await self._delete(self.dead_letter_url, letter.receipt_handle)

    # ------------------------------------------------------------- other

    async def listen(
        self, wake: Callable[[], None], *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """No push channel: claim_batch long-polls instead."""
        task_status.started()
        await anyio.sleep_forever()

    async def ping(self) -> None:
        await self._client.get_queue_attributes(
            QueueUrl=self.queue_url, AttributeNames=["QueueArn"]
        )


async def dead_letter_url(client: Any, queue_url: str) -> str | None:
    """The dead-letter queue named by the queue's redrive policy, if it has one."""
    answer = await client.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["RedrivePolicy"])
    policy = answer.get("Attributes", {}).get("RedrivePolicy")
    if not policy:
        return None
    target = orjson.loads(policy).get("deadLetterTargetArn", "")
    # arn:aws:sqs:<region>:<account>:<name>
    parts = str(target).split(":")
    if len(parts) != 6 or parts[2] != "sqs":
        log.warning("ignoring an unreadable redrive policy", extra={"queue_url": queue_url})
        return None
    found = await client.get_queue_url(QueueName=parts[5], QueueOwnerAWSAccountId=parts[4])
    return str(found["QueueUrl"])


@contextlib.asynccontextmanager
async def open_sqs_queue(
    *,
    queue_url: str,
    endpoint_url: str | None,
    region: str,
    pool: asyncpg.Pool,
    queries: Queries,
    lease_sec: int,
    receive_wait_sec: int = RECEIVE_WAIT_SEC_DEFAULT,
) -> AsyncIterator[SqsQueue]:
    """An SQS client for the life of the block, and the queue over it."""
    config = AioConfig(
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=5,
        # longer than the long poll, or every empty receive would time out
        read_timeout=receive_wait_sec + 20,
    )
    session = get_session()
    async with session.create_client(
        "sqs", endpoint_url=endpoint_url, region_name=region, config=config
    ) as client:
        yield SqsQueue(
            client,
            queue_url,
            pool,
            queries,
            lease_sec=lease_sec,
            dead_letter_url=await dead_letter_url(client, queue_url),
            receive_wait_sec=receive_wait_sec,
        )
