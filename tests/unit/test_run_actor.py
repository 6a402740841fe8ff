"""The run actor's logic on recording fakes, on asyncio and trio.

Against real Postgres, S3 and SQS it is proven in tests/integration/
test_execution.py and tests/chaos/; here each path's calls are pinned down.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson
import pytest

from dpp.actors.run import RunActor, RunEnding, RunServices, result_key
from dpp.adapters.blobs import RECEIPT_COST, RECEIPT_RUN, RECEIPT_SHA256
from dpp.adapters.queue.base import ClaimedRun
from dpp.money import ledger
from dpp.money.rules import Outcome, settle
from dpp.packs import PackRegistry

TENANT = "ten_" + "B" * 26
RUN = "run_" + "C" * 26
TOKEN = "11111111-1111-4111-8111-111111111111"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@dataclass
class FakeLeases:
    lose_lease: bool = False
    calls: list[str] = field(default_factory=list)

    async def renew(self, run: ClaimedRun, version: int, lease_sec: int) -> int | None:
        self.calls.append("renew")
        return None if self.lose_lease else version + 1

    async def claim_for_finalize(self, run: ClaimedRun, version: int) -> int | None:
        self.calls.append("claim")
        return version + 1


@dataclass
class FakeQueue:
    calls: list[str] = field(default_factory=list)

    async def extend_visibility(self, run: ClaimedRun, seconds: int) -> None:
        self.calls.append("extend")

    async def ack(self, run: ClaimedRun) -> None:
        self.calls.append("ack")

    async def release(self, run: ClaimedRun) -> bool:
        self.calls.append("release")
        return True


@dataclass
class FakeBlobs:
    objects: dict[str, tuple[bytes, str, dict[str, str]]] = field(default_factory=dict)

    async def put(self, key: str, body: bytes, content_type: str, metadata: dict) -> None:
        self.objects[key] = (body, content_type, metadata)

    async def delete(self, key: str) -> None:
        self.objects.pop(key, None)


@dataclass
class FakeMoney:
    refuse_with: str | None = None
    requests: list[ledger.SettleRequest] = field(default_factory=list)

    async def settle(self, tenant_id: str, request: ledger.SettleRequest) -> ledger.SettleResult:
        self.requests.append(request)
        if self.refuse_with is not None:
            raise ledger.SettleRefused(request.run_id, self.refuse_with, "already settled")
        settlement = settle(
            request.outcome,
            reserved_usd_micros=5_000,
            minimum_fee_usd_micros=100,
            actual_cost_usd_micros=request.actual_cost_usd_micros,
        )
        return ledger.SettleResult(request.run_id, tenant_id, settlement, True, None)


def claimed(inputs: Any, *, timebox_sec: int = 30, started_ago_s: float = 0.0) -> ClaimedRun:
    return ClaimedRun(
        run_id=RUN,
        tenant_id=TENANT,
        pack_type="echo",
        inputs=inputs,
        timebox_sec=timebox_sec,
        reserved_usd_micros=5_000,
        minimum_fee_usd_micros=100,
        trace_id="a" * 32,
        lease_token=TOKEN,
        version=1,
        attempts=1,
        claimed_at_monotonic=anyio.current_time() - started_ago_s,
    )


def services(**fakes: Any) -> RunServices:
    defaults: dict[str, Any] = {
        "leases": FakeLeases(),
        "queue": FakeQueue(),
        "results": FakeBlobs(),
        "settler": FakeMoney(),
    }
    defaults |= fakes
    return RunServices(packs=PackRegistry.load({}), lease_sec=60, heartbeat_sec=0.05, **defaults)


async def serve(run: ClaimedRun, run_services: RunServices) -> RunEnding:
    with anyio.fail_after(10):
        return await RunActor(run, run_services).serve()


async def test_a_finished_pack_claims_uploads_with_its_receipt_then_settles() -> None:
    run_services = services()
    ending = await serve(claimed({"payload": {"x": 1}}), run_services)
    assert ending is RunEnding.COMPLETED
    body, content_type, metadata = run_services.results.objects[result_key(TENANT, RUN)]
    assert orjson.loads(body) == {"payload": {"x": 1}}
    assert content_type == "application/json"
    assert metadata == {
        RECEIPT_COST: "1000",
        RECEIPT_RUN: RUN,
        RECEIPT_SHA256: hashlib.sha256(body).hexdigest(),
    }
    (request,) = run_services.settler.requests
    assert request.outcome is Outcome.COMPLETED
    assert request.actual_cost_usd_micros == 1_000
    assert request.lease_token == TOKEN and request.from_statuses == {"CLAIMED"}
    assert request.result is not None and request.result.sha256 == metadata[RECEIPT_SHA256]
    assert run_services.leases.calls[-1] == "claim"


async def test_a_pack_error_settles_failed_from_processing_without_an_upload() -> None:
    run_services = services()
    ending = await serve(claimed({"payload": 1, "fail": True}), run_services)
    assert ending is RunEnding.FAILED
    assert run_services.results.objects == {}
    (request,) = run_services.settler.requests
    assert request.outcome is Outcome.FAILED and request.from_statuses == {"PROCESSING"}
    # guarded like the completion: only this holder's lease, at the version it holds
    renewals = run_services.leases.calls.count("renew")  # each beat bumps the version
    assert request.lease_token == TOKEN and request.expected_version == 1 + renewals
    assert request.error["type"] == "https://dpp.dev/problems/pack-error"
    assert "claim" not in run_services.leases.calls


async def test_the_timebox_counts_from_the_claim() -> None:
    run_services = services()
    # claimed 0.95 s of a 1 s timebox ago; the pack wants 10 s
    run = claimed({"payload": 1, "delay_ms": 10_000}, timebox_sec=1, started_ago_s=0.95)
    ending = await serve(run, run_services)
    assert ending is RunEnding.FAILED
    (request,) = run_services.settler.requests
    assert request.error["type"] == "https://dpp.dev/problems/timebox-exceeded"


async def test_a_lost_heartbeat_stops_the_pack_and_settles_nothing() -> None:
    run_services = services(leases=FakeLeases(lose_lease=True))
    ending = await serve(claimed({"payload": 1, "delay_ms": 60_000}), run_services)
    assert ending is RunEnding.LEASE_LOST
    assert run_services.settler.requests == []
    assert run_services.results.objects == {}


@pytest.mark.parametrize(("status", "kept"), [("FAILED", False), ("COMPLETED", True)])
async def test_an_upload_that_lost_to_a_roll_back_is_deleted(status: str, kept: bool) -> None:
    run_services = services(settler=FakeMoney(refuse_with=status))
    ending = await serve(claimed({"payload": 1}), run_services)
    assert ending is RunEnding.LEASE_LOST
    # FAILED never carries a result: ours is deleted. COMPLETED may be another
    # attempt's result under the same key: never touched.
    assert (result_key(TENANT, RUN) in run_services.results.objects) is kept


async def test_cancellation_while_working_releases_the_run() -> None:
    run_services = services()
    actor = RunActor(claimed({"payload": 1, "delay_ms": 60_000}), run_services)
    with anyio.move_on_after(0.2):
        await actor.serve()
    assert run_services.queue.calls == ["release"]
    assert actor.ending is RunEnding.RELEASED
    assert run_services.settler.requests == []
