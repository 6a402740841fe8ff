"""dpp-client against a real ``dpp serve`` (SPEC §7 "Python client").

No mocks: the client talks HTTP to a replica process; faults in transit come
from a real TCP proxy between them. The sync ``Client`` runs in a worker
thread whenever the proxy (which lives in the test's event loop) is in the way.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import httpx
import pytest
from dpp_client import (
    AsyncClient,
    AuthenticationError,
    Client,
    Conflict,
    ConnectionFailed,
    InsufficientBudget,
    InvalidRequest,
    KeySpendLimitExceeded,
    NotFound,
    RateLimited,
    ResultIntegrityError,
    Run,
    RunFailed,
)

from dpp.adapters.blobs import open_blobs
from tests.client.conftest import CREDIT_USD_MICROS, Served
from tests.tcp_proxy import TcpProxy

ECHO_MINIMUM_FEE_USD_MICROS = 100
CLIENT_ROOT = Path(__file__).resolve().parents[2] / "clients" / "python"


async def test_run_end_to_end_with_both_clients(served: Served) -> None:
    key = await served.api_key()

    def blocking() -> object:
        with Client(served.url, key) as dpp:
            echo = {pack.pack_type: pack for pack in dpp.packs()}["echo"]
            assert echo.minimum_fee_usd_micros == ECHO_MINIMUM_FEE_USD_MICROS
            return dpp.run("echo", {"payload": "hello"}, metadata={"by": "sync"})

    assert await anyio.to_thread.run_sync(blocking) == {"payload": "hello"}

    async with AsyncClient(served.url, key) as dpp:
        assert await dpp.run("echo", {"payload": [1, "two"]}) == {"payload": [1, "two"]}
        runs = [run async for run in dpp.runs.list()]
        assert [run.status for run in runs] == ["COMPLETED", "COMPLETED"]
        assert runs[1].metadata == {"by": "sync"}
        assert runs[0].created_at >= runs[1].created_at
        assert runs[0].created_at.tzinfo is not None
        charged = sum(run.charged_usd_micros or 0 for run in runs)
        budget = await dpp.budget()
        assert budget.reserved_usd_micros == 0
        assert budget.balance_usd_micros == CREDIT_USD_MICROS - charged
        assert budget.available_usd_micros == budget.balance_usd_micros
        assert budget.plan.id == "default"
        usage = await dpp.usage()
        assert [(day.pack_type, day.runs, day.completed) for day in usage.days] == [("echo", 2, 2)]
        assert usage.days[0].charged_usd_micros == charged


async def test_a_submit_whose_answer_is_lost_is_retried_with_its_key_and_makes_one_run(
    served: Served, proxy: TcpProxy
) -> None:
    key = await served.api_key()
    through = f"http://{proxy.address}"
    async with AsyncClient(through, key, max_retries=3) as dpp:
        proxy.drop_answers(2)  # the first two attempts reach DPP; their answers do not
        run = await dpp.runs.create("echo", {"payload": "once"})
        assert proxy.answers_dropped_total == 2
        listed = [listed async for listed in dpp.runs.list()]
        assert [listed.id for listed in listed] == [run.id]
        # exactly one charge, nothing else reserved: the money agrees there was one run
        settled = await dpp.runs.wait(run, timeout=30)
        assert settled.charged_usd_micros is not None
        budget = await dpp.budget()
        assert budget.balance_usd_micros == CREDIT_USD_MICROS - settled.charged_usd_micros
        assert budget.reserved_usd_micros == 0
        assert [(day.runs, day.completed) for day in (await dpp.usage()).days] == [(1, 1)]

    def blocking() -> Run:
        with Client(through, key, max_retries=2) as dpp:
            return dpp.runs.create("echo", {"payload": "sync once"})

    proxy.drop_answers(1)
    second = await anyio.to_thread.run_sync(blocking)
    assert proxy.answers_dropped_total == 3
    async with AsyncClient(served.url, key) as dpp:
        assert sorted([r.id async for r in dpp.runs.list()]) == sorted([run.id, second.id])


async def test_without_retries_a_lost_answer_raises_and_the_same_key_gets_the_same_run(
    served: Served, proxy: TcpProxy
) -> None:
    key = await served.api_key()
    async with AsyncClient(f"http://{proxy.address}", key, max_retries=0) as dpp:
        proxy.drop_answers(1)
        with pytest.raises(ConnectionFailed):
            await dpp.runs.create("echo", {"payload": 1}, idempotency_key="agent-task-7")
        again = await dpp.runs.create("echo", {"payload": 1}, idempotency_key="agent-task-7")
        assert [run.id async for run in dpp.runs.list()] == [again.id]
        # the same key with another body is the caller's mistake, not a retry
        with pytest.raises(InvalidRequest) as reused:
            await dpp.runs.create("echo", {"payload": 2}, idempotency_key="agent-task-7")
        assert reused.value.type.endswith("/idempotency-key-reused")
        await dpp.runs.wait(again, timeout=30)


async def test_concurrent_submits_with_one_key_make_one_run(served: Served) -> None:
    """A submit racing its own twin may get 409 idempotency-key-in-use, which the
    client retries into the replay: both calls answer the same run."""
    key = await served.api_key()
    async with AsyncClient(served.url, key, max_retries=10) as dpp:
        created: dict[str, list[str]] = {}

        async def submit(agent_key: str) -> None:
            run = await dpp.runs.create("echo", {"payload": agent_key}, idempotency_key=agent_key)
            created.setdefault(agent_key, []).append(run.id)

        async with anyio.create_task_group() as group:
            for n in range(6):
                for _ in range(3):
                    group.start_soon(submit, f"task-{n}")
        assert all(len(set(ids)) == 1 and len(ids) == 3 for ids in created.values()), created
        listed = sorted([run.id async for run in dpp.runs.list()])
        assert listed == sorted(ids[0] for ids in created.values())
        for ids in created.values():
            await dpp.runs.wait(ids[0], timeout=30)


async def test_retry_after_of_a_429_is_honoured(served: Served) -> None:
    # 20 a minute: a burst, then one request per 3 s (Retry-After: 3).
    key = await served.api_key(requests_per_minute=20)
    bearer = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=served.url, headers=bearer) as raw:
        for _ in range(40):
            if (await raw.get("/v1/budget")).status_code == 429:
                break
        else:
            pytest.fail("the key's rate limit never answered 429")

    async with AsyncClient(served.url, key, max_retries=0) as dpp:
        with pytest.raises(RateLimited) as limited:
            await dpp.budget()
    retry_after = limited.value.retry_after
    assert retry_after is not None and retry_after >= 2, retry_after
    assert limited.value.status == 429 and limited.value.request_id

    async with AsyncClient(served.url, key, max_retries=2) as dpp:
        started = time.monotonic()
        budget = await dpp.budget()
        waited_s = time.monotonic() - started
    assert budget.balance_usd_micros == CREDIT_USD_MICROS
    # a backoff would have retried after at most 0.5 s and been refused again
    assert waited_s >= retry_after - 1.5, (waited_s, retry_after)

    # The plan's concurrent-run limit answers a submit 429 (Retry-After: 1) while
    # another run is in flight; the retried submit (same key) gets in once it ends.
    busy = await served.api_key(plan_id=await served.plan(max_concurrent_runs=1))
    async with AsyncClient(served.url, busy, max_retries=0) as dpp:
        first = await dpp.runs.create("echo", {"payload": 1, "delay_ms": 1_500})
        with pytest.raises(RateLimited) as full:
            await dpp.runs.create("echo", {"payload": 2})
        assert full.value.retry_after == 1.0
    async with AsyncClient(served.url, busy, max_retries=10) as dpp:
        second = await dpp.runs.create("echo", {"payload": 2})
        assert (await dpp.runs.get(first)).terminal
        assert [run.id async for run in dpp.runs.list()] == [second.id, first.id]
        await dpp.runs.wait(second, timeout=30)


async def test_result_refuses_a_body_whose_sha256_does_not_match(served: Served) -> None:
    key = await served.api_key()
    async with AsyncClient(served.url, key) as dpp:
        run = await dpp.runs.wait(await dpp.runs.create("echo", {"payload": "genuine"}), timeout=30)
        assert await dpp.runs.result(run) == {"payload": "genuine"}
        assert run.result is not None
        genuine = (await anyio.to_thread.run_sync(httpx.get, run.result.download_url)).content
        assert hashlib.sha256(genuine).hexdigest() == run.result.sha256

        # Rewrite the stored object behind DPP's back: same size, other bytes...
        object_key = urlsplit(run.result.download_url).path.split("/", 2)[2]
        bucket = served.env["S3_RESULT_BUCKET"]
        forged = genuine.replace(b"genuine", b"forgery")
        assert len(forged) == len(genuine)
        async with open_blobs(served.env["S3_ENDPOINT_URL"], bucket, "us-east-1", 3600) as blobs:
            await blobs.put(object_key, forged, "application/json", {})
            with pytest.raises(ResultIntegrityError) as refused:
                await dpp.runs.result(run)
            assert run.result.sha256 in refused.value.detail
            assert refused.value.status is None
            # ...or another size: refused too, and never parsed
            await blobs.put(object_key, genuine + b" ", "application/json", {})
            with pytest.raises(ResultIntegrityError):
                await dpp.runs.result(run.id)
            await blobs.put(object_key, genuine, "application/json", {})
            assert await dpp.runs.result(run.id) == {"payload": "genuine"}


async def test_errors_map_to_their_classes(served: Served) -> None:
    key = await served.api_key()
    async with AsyncClient(served.url, key, max_retries=0) as dpp:
        with pytest.raises(NotFound) as missing:
            await dpp.runs.get("run_doesnotexist")
        assert missing.value.status == 404 and missing.value.problem["status"] == 404

        with pytest.raises(InvalidRequest) as invalid:
            await dpp.runs.create("no-such-pack", {})
        assert invalid.value.status == 422
        assert invalid.value.field == "pack_type"
        assert invalid.value.errors and invalid.value.errors[0]["field"] == "pack_type"

        with pytest.raises(InvalidRequest) as bad_query:
            await dpp.usage(from_="2026-02-30")
        assert bad_query.value.field == "from"

        run = await dpp.runs.wait(await dpp.runs.create("echo", {"payload": 0}), timeout=30)
        with pytest.raises(Conflict) as conflict:
            await dpp.runs.cancel(run)
        assert conflict.value.status == 409
        assert conflict.value.problem["run_status"] == "COMPLETED"

        with pytest.raises(RunFailed) as failed:
            await dpp.run("echo", {"payload": 0, "fail": True}, timeout=30)
        assert failed.value.run.status == "FAILED"
        assert failed.value.run.charged_usd_micros == ECHO_MINIMUM_FEE_USD_MICROS
        with pytest.raises(RunFailed):
            await dpp.runs.result(failed.value.run)

    poor = await served.api_key(credit_usd_micros=0)
    async with AsyncClient(served.url, poor) as dpp:
        with pytest.raises(InsufficientBudget) as short:
            await dpp.runs.create("echo", {"payload": 0})
        assert short.value.status == 402
        assert short.value.available_usd_micros == 0
        assert (short.value.required_usd_micros or 0) >= ECHO_MINIMUM_FEE_USD_MICROS
        assert [run async for run in dpp.runs.list()] == []

    revoked_shape = key[:-8] + ("0" * 8 if not key.endswith("0" * 8) else "1" * 8)
    async with AsyncClient(served.url, revoked_shape) as dpp:
        with pytest.raises(AuthenticationError) as unauthenticated:
            await dpp.budget()
        assert unauthenticated.value.status == 401


async def test_a_key_at_its_spend_limit_raises_and_budget_shows_the_keys_share(
    served: Served,
) -> None:
    # A limit of one micro covers no run: the first submit is the key's 402,
    # while the tenant's own budget is untouched.
    key = await served.api_key(spend_limit_usd_micros=1)
    async with AsyncClient(served.url, key) as dpp:
        with pytest.raises(KeySpendLimitExceeded) as capped:
            await dpp.runs.create("echo", {"payload": 0})
        assert capped.value.status == 402
        assert capped.value.spend_limit_usd_micros == 1
        assert capped.value.spent_usd_micros == 0
        budget = await dpp.budget()
        assert budget.available_usd_micros == CREDIT_USD_MICROS
        assert budget.key is not None
        assert (budget.key.spend_limit_usd_micros, budget.key.spent_usd_micros) == (1, 0)
        assert budget.key.available_usd_micros == 1
        assert [run async for run in dpp.runs.list()] == []


@pytest.mark.parametrize("served_env", [{"DPP_WORKER_CONCURRENCY": "1"}])
async def test_cancel_refunds_a_queued_run_and_is_idempotent(served: Served) -> None:
    key = await served.api_key()
    async with AsyncClient(served.url, key) as dpp:
        busy = await dpp.runs.create("echo", {"payload": "busy", "delay_ms": 2_000})
        with anyio.fail_after(30):
            while True:  # until the one worker holds it
                if (await dpp.runs.get(busy)).status != "QUEUED":
                    break
                await anyio.sleep(0.05)
        queued = await dpp.runs.create("echo", {"payload": "waits"})  # the one worker is busy
        canceled = await dpp.runs.cancel(queued)
        assert canceled.status == "CANCELED"
        assert canceled.charged_usd_micros == 0
        assert canceled.refunded_usd_micros == queued.reserved_usd_micros
        assert (await dpp.runs.cancel(queued.id)).status == "CANCELED"  # again: 200
        with pytest.raises(ValueError, match="CANCELED"):
            await dpp.runs.result(canceled)
        done = await dpp.runs.wait(busy, timeout=30)
        budget = await dpp.budget()
        assert budget.balance_usd_micros == CREDIT_USD_MICROS - (done.charged_usd_micros or 0)
        assert budget.reserved_usd_micros == 0


async def test_wait_gives_up_with_timeout_error_and_can_resume(served: Served) -> None:
    key = await served.api_key()
    async with AsyncClient(served.url, key) as dpp:
        run = await dpp.runs.create("echo", {"payload": "slow", "delay_ms": 2_500})
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await dpp.runs.wait(run, timeout=0.5)
        assert time.monotonic() - started < 2.0
        finished = await dpp.runs.wait(run, timeout=30)
        assert finished.status == "COMPLETED"

    def blocking() -> None:
        with Client(served.url, key) as dpp:
            slow = dpp.runs.create("echo", {"payload": "slow", "delay_ms": 2_500})
            with pytest.raises(TimeoutError):
                dpp.runs.wait(slow.id, timeout=0.3)
            assert dpp.runs.wait(slow.id, timeout=30).status == "COMPLETED"

    await anyio.to_thread.run_sync(blocking)


async def test_list_follows_cursors_and_filters_by_status(served: Served) -> None:
    key = await served.api_key()
    async with AsyncClient(served.url, key) as dpp:
        created = [await dpp.runs.create("echo", {"payload": n}) for n in range(5)]
        failing = await dpp.runs.create("echo", {"payload": "x", "fail": True})
        for run in [*created, failing]:
            await dpp.runs.wait(run, timeout=30)
        newest_first = [run.id for run in reversed([*created, failing])]
        assert [run.id async for run in dpp.runs.list(limit=2)] == newest_first
        first_page = await dpp.runs.page(limit=4)
        assert first_page.has_more and first_page.next_cursor is not None
        rest = await dpp.runs.page(limit=4, cursor=first_page.next_cursor)
        assert [run.id for run in (*first_page.data, *rest.data)] == newest_first
        assert not rest.has_more and rest.next_cursor is None
        assert [run.id async for run in dpp.runs.list(status="FAILED")] == [failing.id]
        both = [run.id async for run in dpp.runs.list(status=["FAILED", "COMPLETED"], limit=3)]
        assert both == newest_first

    def blocking() -> list[str]:
        with Client(served.url, key) as dpp:
            return [run.id for run in dpp.runs.list(limit=1, status="COMPLETED")]

    assert await anyio.to_thread.run_sync(blocking) == newest_first[1:]


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_the_async_client_runs_on_trio(served: Served, anyio_backend: str) -> None:
    key = await served.api_key()
    async with AsyncClient(served.url, key) as dpp:
        assert await dpp.run("echo", {"payload": "trio"}, timeout=30) == {"payload": "trio"}
        assert [run.status async for run in dpp.runs.list()] == ["COMPLETED"]


async def test_the_readme_opens_with_an_example_that_runs(served: Served) -> None:
    """clients/python/README.md's first code block, pasted as is, against a real DPP."""
    readme = (CLIENT_ROOT / "README.md").read_text()
    assert readme.startswith("# "), "the README opens with its title, then the example"
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert readme.index("```python") < readme.index("\n## "), "the example comes first"
    assert len(example.strip().splitlines()) <= 12
    key = await served.api_key()
    env = {**os.environ, "DPP_URL": served.url, "DPP_API_KEY": key}
    ran = await anyio.run_process(
        [sys.executable, "-c", example], env=env, check=False, stderr=subprocess.STDOUT
    )
    assert ran.returncode == 0, ran.stdout.decode()
    assert ran.stdout.decode().strip() == "{'payload': 'hello'}"
