"""`GET /v1/results/{token}`: a local results store's downloads (SPEC §5).

A real replica's execution side (dispatcher, run actors, budget actors) stores
an echo run's result on local disk; the run object's link is DPP's own, built
on the base URL the client used, and needs no API key. Tampered and expired
links are 403 problems, a result deleted by retention a 404 problem — never a
500 — and no token reaches a file outside the results.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlsplit

import anyio
import httpx
import orjson

from dpp.actors.run import result_key
from dpp.adapters.local_results import DOWNLOAD_CHUNK_BYTES, LocalResults
from dpp.app import build_app
from tests.asgi import http_scope
from tests.conftest import TEST_RESULT_SIGNING_KEY
from tests.integration.test_execution import Harness, open_harness

BASE_URL = "http://results.test:8123"
PROBLEM_TYPE = "application/problem+json"


@contextlib.asynccontextmanager
async def local_store(
    services: Any, database_url: str, redis_prefix: str, tmp_path: Any, **environment: str
) -> AsyncIterator[tuple[Harness, httpx.AsyncClient, str]]:
    """A harness on a local results store, its HTTP front, and a tenant API key."""
    async with open_harness(
        services,
        database_url,
        redis_prefix,
        DPP_RESULTS_DIR=str(tmp_path / "results"),
        DPP_RESULT_SIGNING_KEY=TEST_RESULT_SIGNING_KEY,
        **environment,
    ) as h:
        _, api_key = await h.context.tenancy.issue_key(h.tenant_id)
        transport = httpx.ASGITransport(app=build_app(h.context))
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            yield h, client, api_key


async def completed_run(h: Harness, client: httpx.AsyncClient, api_key: str) -> dict[str, Any]:
    run_id = await h.submit({"payload": {"hello": "disk"}})
    await h.start_dispatcher()
    await h.wait_status(run_id, "COMPLETED")
    answer = await client.get(f"/v1/runs/{run_id}", headers={"Authorization": f"Bearer {api_key}"})
    assert answer.status_code == 200, answer.text
    document: dict[str, Any] = answer.json()
    return document


def token_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


async def test_a_completed_runs_link_downloads_its_result_without_an_api_key(
    services, database_url, redis_prefix, tmp_path, captured_logs
) -> None:
    async with local_store(services, database_url, redis_prefix, tmp_path) as (h, client, key):
        run = await completed_run(h, client, key)
        result = run["result"]
        assert result["download_url"].startswith(f"{BASE_URL}/v1/results/r1.")
        answer = await client.get(result["download_url"])  # no Authorization header
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"].startswith(result["content_type"])
        assert orjson.loads(answer.content) == {"payload": {"hello": "disk"}}
        assert len(answer.content) == result["bytes"]
        assert hashlib.sha256(answer.content).hexdigest() == result["sha256"]
        assert answer.headers["x-content-type-options"] == "nosniff"
        # the file is where the store says, with nothing half-written beside it
        store = h.adapters.blobs
        assert isinstance(store, LocalResults)
        directory = (store.root / result_key(h.tenant_id, run["id"])).parent
        assert [p.name for p in directory.iterdir()] == [run["id"]]
        # the listing carries the same kind of link
        listing = await client.get("/v1/runs", headers={"Authorization": f"Bearer {key}"})
        (listed,) = listing.json()["data"]
        assert listed["result"]["download_url"].startswith(f"{BASE_URL}/v1/results/")
        await h.assert_audit_ok()
        # the token is a credential: the access log names the route, never the token
        # (the test's own HTTP client, httpx, logs its URLs: only DPP's lines count)
        dpp_lines = [line for line in captured_logs.lines() if line["logger"].startswith("dpp")]
        assert not [line for line in dpp_lines if token_of(result["download_url"]) in str(line)]
        assert any(line.get("path") == "/v1/results/<redacted>" for line in dpp_lines)


async def test_tampered_and_expired_links_are_403_problems(
    services, database_url, redis_prefix, tmp_path
) -> None:
    async with local_store(
        services, database_url, redis_prefix, tmp_path, DPP_PRESIGN_EXPIRY_SEC="60"
    ) as (h, client, key):
        run = await completed_run(h, client, key)
        token = token_of(run["result"]["download_url"])
        version, payload, mac = token.split(".")
        tampered = [
            f"{version}.{payload}.{mac[:-2]}AA" if not mac.endswith("AA") else f"{token}x",
            f"{version}.{payload[:-1]}{'A' if payload[-1] != 'A' else 'B'}.{mac}",
            "r1.e30.e30",
            "not-a-token",
            "x" * 600,
        ]
        for bad in tampered:
            answer = await client.get(f"/v1/results/{bad}")
            assert answer.status_code == 403, (bad, answer.text)
            assert answer.headers["content-type"] == PROBLEM_TYPE
            assert answer.json()["type"] == "https://dpp.dev/problems/result-link-invalid"
        store = h.adapters.blobs
        assert isinstance(store, LocalResults)
        expired = store.tokens.sign(result_key(h.tenant_id, run["id"]), now=time.time() - 61)
        answer = await client.get(f"/v1/results/{expired}")
        assert answer.status_code == 403
        assert "expired" in answer.json()["detail"]
        # the genuine link still works
        assert (await client.get(f"/v1/results/{token}")).status_code == 200


async def test_a_result_deleted_by_retention_is_a_404_problem(
    services, database_url, redis_prefix, tmp_path
) -> None:
    async with local_store(services, database_url, redis_prefix, tmp_path) as (h, client, key):
        run = await completed_run(h, client, key)
        url = run["result"]["download_url"]
        await h.pool.execute(
            "UPDATE runs SET retention_until = now() - interval '1 second' WHERE id = $1",
            run["id"],
        )
        report = await (await h.start_reconciler()).reconcile_once()
        assert report["results_deleted"] == 1
        store = h.adapters.blobs
        assert isinstance(store, LocalResults)
        assert not (store.root / result_key(h.tenant_id, run["id"])).exists()
        answer = await client.get(url)
        assert answer.status_code == 404, answer.text
        assert answer.headers["content-type"] == PROBLEM_TYPE
        await h.assert_audit_ok()


async def test_a_large_result_is_streamed_with_its_length(
    services, database_url, redis_prefix, tmp_path
) -> None:
    """The download is sent in chunks (one held in memory at a time), with its
    Content-Length, and arrives byte for byte."""
    async with local_store(services, database_url, redis_prefix, tmp_path) as (h, client, _key):
        store = h.adapters.blobs
        assert isinstance(store, LocalResults)
        body = hashlib.sha256(b"seed").digest() * (4 * DOWNLOAD_CHUNK_BYTES // 32) + b"!"
        result = result_key(h.tenant_id, "run_large")
        receipt = {"sha256": hashlib.sha256(body).hexdigest(), "run-id": "run_large"}
        await store.put(result, body, "application/octet-stream", receipt)
        path = urlsplit(await store.presigned_get(result)).path
        messages: list[dict[str, Any]] = []
        requests = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive() -> dict[str, Any]:
            if requests:
                return requests.pop()
            await anyio.sleep_forever()  # the client stays until the body is sent
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            messages.append(message)

        scope = http_scope("GET", path.encode(), host=b"results.test")
        await build_app(h.context)(scope, receive, send)
        start, *bodies = messages
        assert start["status"] == 200
        headers = dict(start["headers"])
        assert headers[b"content-length"] == str(len(body)).encode()
        assert headers[b"etag"] == f'"{receipt["sha256"]}"'.encode()
        sent = [m["body"] for m in bodies if m["body"]]
        assert len(sent) >= 4 and max(len(chunk) for chunk in sent) <= DOWNLOAD_CHUNK_BYTES
        assert b"".join(sent) == body
        assert not bodies[-1].get("more_body", False)
        # the same through a client
        answer = await client.get(path)
        assert answer.status_code == 200 and answer.content == body


async def test_an_interrupted_download_resumes_with_a_range(
    services, database_url, redis_prefix, tmp_path
) -> None:
    """A client that lost its connection mid-download asks for the rest (as it
    would of an S3 presigned link): 206 with the bytes from there on, the same
    ETag to check it resumes the same result; a range past the end is a 416
    problem naming the size; If-Range with another copy's tag, or several
    ranges, get the whole result."""
    async with local_store(services, database_url, redis_prefix, tmp_path) as (h, client, _key):
        store = h.adapters.blobs
        assert isinstance(store, LocalResults)
        body = hashlib.sha256(b"resume").digest() * (3 * DOWNLOAD_CHUNK_BYTES // 32) + b"end"
        result = result_key(h.tenant_id, "run_resume")
        sha256 = hashlib.sha256(body).hexdigest()
        await store.put(result, body, "application/octet-stream", {"sha256": sha256})
        path = urlsplit(await store.presigned_get(result)).path

        whole = await client.get(path)
        assert whole.status_code == 200 and whole.content == body
        assert whole.headers["accept-ranges"] == "bytes"
        etag = whole.headers["etag"]
        assert etag == f'"{sha256}"'

        received = DOWNLOAD_CHUNK_BYTES + 5  # where the connection broke
        rest = await client.get(path, headers={"Range": f"bytes={received}-", "If-Range": etag})
        assert rest.status_code == 206, rest.text
        assert rest.headers["content-range"] == f"bytes {received}-{len(body) - 1}/{len(body)}"
        assert rest.headers["content-length"] == str(len(body) - received)
        assert rest.headers["etag"] == etag
        assert body[:received] + rest.content == body

        tail = await client.get(path, headers={"Range": "bytes=-3"})
        assert (tail.status_code, tail.content) == (206, b"end")
        middle = await client.get(path, headers={"Range": "bytes=10-19"})
        assert (middle.status_code, middle.content) == (206, body[10:20])

        past = await client.get(path, headers={"Range": f"bytes={len(body)}-"})
        assert past.status_code == 416
        assert past.headers["content-type"] == PROBLEM_TYPE
        assert past.headers["content-range"] == f"bytes */{len(body)}"
        assert past.json()["type"] == "https://dpp.dev/problems/range-not-satisfiable"

        for headers in (
            {"Range": "bytes=100-", "If-Range": '"another-result"'},
            {"Range": "bytes=0-9,20-29"},
            {"Range": "bytes=oops"},
        ):
            answer = await client.get(path, headers=headers)
            assert (answer.status_code, answer.content) == (200, body), headers

        # the range is checked after the token: a bad link is still 403
        refused = await client.get("/v1/results/r1.e30.e30", headers={"Range": "bytes=0-"})
        assert refused.status_code == 403


async def test_no_token_reaches_a_file_outside_the_results(
    services, database_url, redis_prefix, tmp_path
) -> None:
    (tmp_path / "secret.txt").write_text("not for download")
    async with local_store(services, database_url, redis_prefix, tmp_path) as (_, client, _key):
        for path in (
            "/v1/results/..%2Fsecret.txt",
            "/v1/results/" + quote("../../secret.txt", safe=""),
            "/v1/results/%2e%2e",
            "/v1/results/..",
            "/v1/results/r1.Li4vc2VjcmV0LnR4dA.AAAA",  # base64url("../secret.txt")
        ):
            answer = await client.get(path)
            # 401: a decoded "/" makes it no download path, so the /v1 gate answers
            assert answer.status_code in (401, 403, 404), (path, answer.status_code)
            assert b"not for download" not in answer.content
        # a path with more segments is no download, so it needs a key like any /v1 path
        assert (await client.get("/v1/results/a/b")).status_code == 401


async def test_with_s3_results_dpp_serves_no_downloads(
    services, database_url, redis_prefix
) -> None:
    async with open_harness(services, database_url, redis_prefix) as h:
        transport = httpx.ASGITransport(app=build_app(h.context))
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            answer = await client.get("/v1/results/r1.e30.e30")
        assert answer.status_code == 404
        assert answer.headers["content-type"] == PROBLEM_TYPE
