"""The local results store (SPEC §5): atomic, durable writes and signed links.

Real files in a temporary directory (no fake file system): a result and its
receipt appear together or not at all, a crash leaves only a temporary file
that start-up removes, and a download token names exactly one result key —
signed, expiring, and never a path of the client's choosing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from pathlib import Path

import anyio
import pytest

from dpp.adapters import local_results
from dpp.adapters.blobs import RECEIPT_COST, RECEIPT_RUN, RECEIPT_SHA256
from dpp.adapters.local_results import (
    DOWNLOAD_CHUNK_BYTES,
    TEMP_PREFIX,
    LocalResults,
    ResultFileCorrupt,
    ResultTokens,
    TokenExpired,
    TokenRefused,
    open_local_results,
)
from dpp.config import ConfigError, load_settings

SIGNING_KEY = "unit-test-signing-key-0123456789abcdef"
KEY = "results/ten_abc123/run_def456"
BODY = b'{"payload": "hello"}'


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


def receipt(run_id: str = "run_def456", body: bytes = BODY) -> dict[str, str]:
    return {
        RECEIPT_COST: "1000",
        RECEIPT_RUN: run_id,
        RECEIPT_SHA256: hashlib.sha256(body).hexdigest(),
    }


async def store(tmp_path: Path, expiry_sec: int = 3600) -> LocalResults:
    return await open_local_results(str(tmp_path / "results"), SIGNING_KEY, expiry_sec)


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(TEMP_PREFIX)]


# --------------------------------------------------------------- the store


async def test_put_head_get_delete_round_trip(tmp_path: Path) -> None:
    results = await store(tmp_path)
    assert await results.head(KEY) is None
    await results.put(KEY, BODY, "application/json", receipt())
    stored = await results.head(KEY)
    assert stored is not None
    assert (stored.key, stored.bytes, stored.content_type) == (KEY, len(BODY), "application/json")
    assert stored.metadata == receipt()
    assert await results.get(KEY) == BODY
    assert temporaries(results.root) == []
    await results.delete(KEY)
    assert await results.head(KEY) is None
    await results.delete(KEY)  # deleting a missing result is not an error
    with pytest.raises(FileNotFoundError):
        await results.get(KEY)


async def test_files_are_private_to_the_owner(tmp_path: Path) -> None:
    results = await store(tmp_path)
    await results.put(KEY, BODY, "application/json", receipt())
    assert (results.root / KEY).stat().st_mode & 0o077 == 0
    assert (results.root / "results" / "ten_abc123").stat().st_mode & 0o077 == 0


async def test_a_second_put_replaces_result_and_receipt_together(tmp_path: Path) -> None:
    results = await store(tmp_path)
    await results.put(KEY, BODY, "application/json", receipt())
    other = b"another attempt's result"
    await results.put(KEY, other, "text/plain", receipt(body=other))
    stored = await results.head(KEY)
    assert stored is not None and stored.bytes == len(other)
    assert stored.metadata[RECEIPT_SHA256] == hashlib.sha256(other).hexdigest()
    assert await results.get(KEY) == other


async def test_a_write_that_fails_before_the_rename_leaves_nothing_visible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The crash point inside a local put: everything is written and fsynced
    but not renamed. No result appears (the reconciler rolls the run back), and
    the temporary file is gone."""
    results = await store(tmp_path)

    def no_rename(source: object, target: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(local_results.os, "replace", no_rename)
    with pytest.raises(OSError, match="disk full"):
        await results.put(KEY, BODY, "application/json", receipt())
    monkeypatch.undo()
    assert await results.head(KEY) is None
    assert temporaries(results.root) == []


async def test_puts_at_once_are_each_durable_and_fail_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Puts that arrive together are written together (group commit), yet each
    answers for its own result: every good one is readable with its own
    receipt, across tenants' directories; the one whose rename fails raises
    alone and leaves nothing behind."""
    results = await store(tmp_path)
    keys = [f"results/ten_t{index % 3}/run_r{index}" for index in range(40)]
    doomed = keys[17]
    replace = os.replace

    def replace_unless_doomed(source: str | Path, target: str | Path) -> None:
        if str(target).endswith(doomed):
            raise OSError("disk full")
        replace(source, target)

    monkeypatch.setattr(local_results.os, "replace", replace_unless_doomed)
    batches: list[int] = []
    write_batch = local_results._write_batch

    def counted(root: Path, entries: list[local_results._QueuedWrite]) -> None:
        batches.append(len(entries))
        write_batch(root, entries)

    monkeypatch.setattr(local_results, "_write_batch", counted)
    outcomes: dict[str, BaseException | None] = {}

    async def put(key: str) -> None:
        body = key.encode()
        try:
            await results.put(key, body, "text/plain", receipt(key.rsplit("/", 1)[1], body))
        except OSError as error:
            outcomes[key] = error
        else:
            outcomes[key] = None

    async with anyio.create_task_group() as tasks:
        for key in keys:
            tasks.start_soon(put, key)
    monkeypatch.undo()
    assert str(outcomes.pop(doomed)) == "disk full"
    assert set(outcomes.values()) == {None}
    assert sum(batches) == len(keys) and len(batches) < len(keys)  # they went together
    for key in outcomes:
        stored = await results.head(key)
        assert stored is not None and stored.metadata[RECEIPT_RUN] == key.rsplit("/", 1)[1]
        assert await results.get(key) == key.encode()
    assert await results.head(doomed) is None
    assert temporaries(results.root) == []


async def test_every_write_slot_comes_back_after_a_storm(tmp_path: Path) -> None:
    """Slots freed together hand over different batches: after each storm of
    puts the writer is idle again, every slot free, so the next puts never wait
    for a batch nobody will write (a slot handed the same queued put twice was
    lost, and with all of them lost every later put waited forever)."""
    root = (await store(tmp_path)).root
    writer = local_results._GroupWriter(root, batch_max=1, batches_max=2)
    for storm in range(20):
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tasks:
                for index in range(30):
                    key = f"results/ten_storm/run_s{storm}x{index}"
                    tasks.start_soon(writer.write, key, (b"{}\n", key.encode()))
        assert (writer._writing, writer._queue) == (0, []), storm
    assert len(list((root / "results" / "ten_storm").iterdir())) == 20 * 30


async def test_a_directory_that_cannot_be_synced_fails_only_its_own_puts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rename is durable only once its directory is fsynced: when that fails,
    every put into that directory raises (the run actor leaves the run to the
    reconciler), while the same batch's puts elsewhere succeed."""
    results = await store(tmp_path)
    fsync_directory = local_results._fsync_directory

    def failing_for_one_tenant(directory: Path) -> None:
        if directory.name == "ten_bad":
            raise OSError("I/O error")
        fsync_directory(directory)

    monkeypatch.setattr(local_results, "_fsync_directory", failing_for_one_tenant)
    keys = [f"results/ten_{tenant}/run_r{index}" for index in range(6) for tenant in ("ok", "bad")]
    failures: dict[str, str] = {}

    async def put(key: str) -> None:
        try:
            await results.put(key, BODY, "application/json", receipt())
        except OSError as error:
            failures[key] = str(error)

    async with anyio.create_task_group() as tasks:
        for key in keys:
            tasks.start_soon(put, key)
    assert failures == {key: "I/O error" for key in keys if "ten_bad" in key}


async def test_a_put_through_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    """A tenant directory that is a link out of the store is never written
    through; a link planted as the result file itself is replaced, not followed."""
    results = await store(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (results.root / "results").mkdir()
    (results.root / "results" / "ten_evil").symlink_to(outside)
    with pytest.raises(AssertionError):
        await results.put("results/ten_evil/run_x", BODY, "application/json", receipt())
    assert list(outside.iterdir()) == []
    target = outside / "passwd"
    target.write_bytes(b"untouched")
    planted = results.root / KEY
    planted.parent.mkdir(parents=True)
    planted.symlink_to(target)
    await results.put(KEY, BODY, "application/json", receipt())
    assert target.read_bytes() == b"untouched"
    assert not planted.is_symlink() and await results.get(KEY) == BODY


async def test_a_dead_writers_temporary_file_is_invisible_and_swept_at_start(
    tmp_path: Path,
) -> None:
    results = await store(tmp_path)
    directory = results.root / "results" / "ten_abc123"
    directory.mkdir(parents=True)
    stale, fresh = directory / f"{TEMP_PREFIX}dead", directory / f"{TEMP_PREFIX}writing"
    for path in (stale, fresh):
        path.write_bytes(b'{"content_type": "application/json", "metadata": {}}\n' + BODY)
    long_ago = time.time() - local_results.TEMP_STALE_SEC - 60
    os.utime(stale, (long_ago, long_ago))
    assert await results.head(KEY) is None
    await store(tmp_path)  # a restart
    assert not stale.exists()
    # another replica on a shared volume may be writing this one right now
    assert fresh.exists()


@pytest.mark.parametrize(
    "content",
    [b"", b"no receipt line at all", b"not json\n" + BODY, b"[1, 2]\n" + BODY, b"{}\n" + BODY],
)
async def test_a_corrupt_result_file_is_unreadable_evidence_not_absent(
    tmp_path: Path, content: bytes
) -> None:
    """The reconciler must not read a damaged file as "no result" (that would
    roll back a run whose result may exist): it raises, which the reconciler
    counts as unreadable evidence and, if it persists, sets aside."""
    results = await store(tmp_path)
    path = results.root / KEY
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(ResultFileCorrupt):
        await results.head(KEY)


async def test_only_result_keys_become_paths(tmp_path: Path) -> None:
    results = await store(tmp_path)
    for key in ("../escape", "results/ten_a/../../x", "/etc/passwd", "results/ten_a/run_b/c"):
        with pytest.raises(AssertionError):
            await results.head(key)


async def test_ping_fails_on_a_directory_it_cannot_write(tmp_path: Path) -> None:
    results = await store(tmp_path)
    await results.ping()
    results.root.chmod(0o500)
    try:
        if os.access(results.root, os.W_OK):
            pytest.skip("running as a user that ignores permissions (root)")
        with pytest.raises(OSError):
            await results.ping()
    finally:
        results.root.chmod(0o700)


# --------------------------------------------------------------- the links


def tokens(expiry_sec: int = 3600, key: str = SIGNING_KEY) -> ResultTokens:
    return ResultTokens(key.encode(), expiry_sec)


def test_a_token_names_its_key_until_it_expires() -> None:
    signer = tokens(expiry_sec=60)
    token = signer.sign(KEY, now=1_000_000)
    assert signer.verify(token, now=1_000_059) == KEY
    with pytest.raises(TokenExpired):
        signer.verify(token, now=1_000_060)
    assert "/" not in token and len(token) <= local_results.TOKEN_CHARS_MAX


def test_a_reused_token_is_the_one_signing_again_makes() -> None:
    signer = tokens(expiry_sec=60)
    first = signer.sign(KEY, now=1_000_000.1)
    assert signer.sign(KEY, now=1_000_000.9) == first  # the same expiry second
    assert first == tokens(expiry_sec=60).sign(KEY, now=1_000_000.5)  # a fresh signer agrees
    later = signer.sign(KEY, now=1_000_001.0)
    assert later != first and signer.verify(later, now=1_000_060) == KEY
    with pytest.raises(TokenExpired):
        signer.verify(first, now=1_000_060)  # a reused token expires as it always did
    assert signer.sign(KEY + "7", now=1_000_000.1) != first  # per key
    # bounded: full, it starts over, and still answers the same tokens
    for second in range(local_results.SIGNED_TOKENS_CACHED + 5):
        assert signer.sign(KEY, now=2_000_000 + second) == forged(
            f"{2_000_060 + second}:{KEY}".encode()
        )
    assert len(signer._signed) <= local_results.SIGNED_TOKENS_CACHED


@pytest.mark.parametrize("expiry_sec", [60, 61, 62])  # payloads of every length mod 3
def test_every_tampered_token_is_refused(expiry_sec: int) -> None:
    signer = tokens(expiry_sec)
    for key in (KEY, KEY + "7", KEY + "78"):
        token = signer.sign(key)
        for index in range(len(token)):
            if token[index] == ".":
                continue
            for replacement in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_":
                if replacement == token[index]:
                    continue
                tampered = token[:index] + replacement + token[index + 1 :]
                with pytest.raises(TokenRefused):
                    signer.verify(tampered)
    token = signer.sign(KEY)
    for bad in ("", ".", "r1..", "r1.x.y", token + "x", token[:-1], "r2" + token[2:], "é" * 5):
        with pytest.raises(TokenRefused):
            signer.verify(bad)
    with pytest.raises(TokenRefused):
        tokens(key="another-signing-key-0123456789abcdef").verify(token)


def forged(payload: bytes, key: str = SIGNING_KEY) -> str:
    """A token over any payload, correctly signed: what a leaked key would allow."""
    mac = hmac.new(key.encode(), b"r1." + payload, "sha256").digest()
    encode = base64.urlsafe_b64encode
    return f"r1.{encode(payload).rstrip(b'=').decode()}.{encode(mac).rstrip(b'=').decode()}"


def test_even_a_validly_signed_token_cannot_name_a_path_outside_the_results() -> None:
    signer = tokens()
    expires = int(time.time()) + 600
    assert signer.verify(forged(f"{expires}:{KEY}".encode())) == KEY
    for key in ("../../etc/passwd", "results/ten_a/../../../etc/passwd", "/etc/passwd", ""):
        with pytest.raises(TokenRefused):
            signer.verify(forged(f"{expires}:{key}".encode()))


async def _download(results: LocalResults, token: str) -> tuple[bytes, int, str, str] | None:
    opened = await results.open_signed(token)
    if opened is None:
        return None
    body = b"".join([chunk async for chunk in opened.chunks()])
    return body, opened.size, opened.content_type, opened.sha256


async def test_open_signed_serves_the_result_and_says_when_it_is_gone(tmp_path: Path) -> None:
    results = await store(tmp_path)
    await results.put(KEY, BODY, "application/json", receipt())
    link = await results.presigned_get(KEY, base_url="http://api.example:8000/")
    assert link.startswith("http://api.example:8000/v1/results/r1.")
    token = link.rsplit("/", 1)[1]
    assert await _download(results, token) == (
        BODY,
        len(BODY),
        "application/json",
        hashlib.sha256(BODY).hexdigest(),
    )
    await results.delete(KEY)
    assert await _download(results, token) is None
    assert (await results.presigned_get(KEY)).startswith("/v1/results/")


async def test_a_large_result_streams_in_chunks_and_closes_its_file(tmp_path: Path) -> None:
    """A download holds one chunk at a time, not the result; its file is closed
    once the body is sent, and retention deleting the result meanwhile does not
    cut it short (the open file keeps its bytes)."""
    results = await store(tmp_path)
    body = bytes(range(256)) * (3 * DOWNLOAD_CHUNK_BYTES // 256) + b"tail"
    await results.put(KEY, body, "application/octet-stream", receipt())
    token = (await results.presigned_get(KEY)).rsplit("/", 1)[1]
    opened = await results.open_signed(token)
    assert opened is not None and opened.size == len(body)
    chunks = opened.chunks()
    first = await anext(chunks)
    assert len(first) == DOWNLOAD_CHUNK_BYTES
    await results.delete(KEY)  # retention, mid-download
    rest = [chunk async for chunk in chunks]
    assert [len(chunk) for chunk in rest] == [DOWNLOAD_CHUNK_BYTES] * 2 + [4]
    assert first + b"".join(rest) == body
    assert opened._file.closed  # the file must not leak


async def test_a_range_streams_only_its_bytes_and_closes_its_file(tmp_path: Path) -> None:
    """A resumed download reads from its first byte (past the receipt line), in
    chunks, up to its length; a refused range closes the file it opened."""
    results = await store(tmp_path)
    body = bytes(range(256)) * (3 * DOWNLOAD_CHUNK_BYTES // 256)
    await results.put(KEY, body, "application/octet-stream", receipt())
    token = (await results.presigned_get(KEY)).rsplit("/", 1)[1]
    for first, length in [
        (0, 10),
        (1, None),
        (DOWNLOAD_CHUNK_BYTES - 3, DOWNLOAD_CHUNK_BYTES + 7),
        (len(body) - 1, 1),
        (len(body), 0),
    ]:
        opened = await results.open_signed(token)
        assert opened is not None
        chunks = [chunk async for chunk in opened.chunks(first, length)]
        end = len(body) if length is None else first + length
        assert b"".join(chunks) == body[first:end], (first, length)
        assert all(len(chunk) <= DOWNLOAD_CHUNK_BYTES for chunk in chunks)
        assert opened._file.closed
    opened = await results.open_signed(token)
    assert opened is not None
    opened.close()  # a range refused: no body read
    assert opened._file.closed


async def test_a_download_stopped_early_closes_its_file(tmp_path: Path) -> None:
    results = await store(tmp_path)
    await results.put(KEY, b"x" * (2 * DOWNLOAD_CHUNK_BYTES), "text/plain", receipt())
    token = (await results.presigned_get(KEY)).rsplit("/", 1)[1]
    opened = await results.open_signed(token)
    assert opened is not None
    chunks = opened.chunks()
    await anext(chunks)
    await chunks.aclose()  # the client went away
    assert opened._file.closed  # the file must not leak


# --------------------------------------------------------------- configuration


def test_a_local_store_needs_a_signing_key_outside_development() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"DPP_RESULTS_DIR": "/var/lib/dpp/results"})
    assert str(caught.value).startswith("DPP_RESULT_SIGNING_KEY: required")
    settings = load_settings({"DPP_RESULTS_DIR": "/srv/results", "DPP_DEVELOPMENT": "true"})
    assert settings.results_dir == "/srv/results" and settings.result_signing_key is None
    settings = load_settings(
        {"DPP_RESULTS_DIR": "/srv/results", "DPP_RESULT_SIGNING_KEY": SIGNING_KEY}
    )
    assert settings.result_signing_key == SIGNING_KEY
    assert SIGNING_KEY not in repr(settings)


def test_bad_local_store_settings_are_one_line_that_never_echoes_the_key() -> None:
    with pytest.raises(ConfigError, match="DPP_RESULTS_DIR='relative/dir': expected an absolute"):
        load_settings({"DPP_RESULTS_DIR": "relative/dir", "DPP_RESULT_SIGNING_KEY": SIGNING_KEY})
    with pytest.raises(ConfigError) as caught:
        load_settings({"DPP_RESULT_SIGNING_KEY": "short-secret"})
    assert "at least 32" in str(caught.value) and "short-secret" not in str(caught.value)
