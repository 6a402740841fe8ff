"""``dpp_batch_size``: every request that group commit or coalescing served is
counted once, in the batch that served it, so an operator reads how well the
batching works (mean = sum / count) from /metrics. Against real Postgres and
Redis, through a whole replica."""

from __future__ import annotations

import anyio
import httpx
from prometheus_client.parser import text_string_to_metric_families

from dpp.metrics import BATCH_KINDS
from tests.integration.test_runs_api import ECHO, _tenant

SUBMITS = 8  # the default plan allows 10 open runs
READS = 20


async def _batch_sizes(http: httpx.AsyncClient) -> dict[str, tuple[float, float]]:
    """kind -> (batches, requests) of ``dpp_batch_size``."""
    answer = await http.get("/metrics")
    assert answer.status_code == 200
    counts: dict[str, float] = {}
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(answer.text):
        if family.name != "dpp_batch_size":
            continue
        for sample in family.samples:
            kind = sample.labels["kind"]
            if sample.name.endswith("_count"):
                counts[kind] = sample.value
            elif sample.name.endswith("_sum"):
                sums[kind] = sample.value
    return {kind: (counts[kind], sums[kind]) for kind in counts}


async def test_every_request_is_counted_once_in_the_batch_that_served_it(
    http: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    start = await _batch_sizes(http)
    assert set(start) == BATCH_KINDS, "every kind is exported from the start"
    assert all(sizes == (0.0, 0.0) for sizes in start.values())
    _, key = await _tenant(http, admin_headers, 1_000_000)
    accepted: list[str] = []

    async def submit() -> None:
        answer = await http.post("/v1/runs", json=ECHO, headers=key)
        assert answer.status_code == 202, answer.text
        accepted.append(answer.json()["id"])

    async def read(run_id: str) -> None:
        answer = await http.get(f"/v1/runs/{run_id}", headers=key)
        assert answer.status_code == 200, answer.text

    async with anyio.create_task_group() as group:
        for _ in range(SUBMITS):
            group.start_soon(submit)
    async with anyio.create_task_group() as group:
        for index in range(READS):
            group.start_soon(read, accepted[index % SUBMITS])
    sizes = await _batch_sizes(http)
    batches, served = sizes["reservation"]
    assert served == SUBMITS and 1 <= batches <= SUBMITS
    batches, served = sizes["read"]
    assert served == READS and 1 <= batches <= READS
    batches, served = sizes["rate_limit"]
    assert served == SUBMITS + READS and 1 <= batches <= SUBMITS + READS
    # nothing executes in this replica (no dispatcher): nothing settled
    assert sizes["settlement"] == (0.0, 0.0)
