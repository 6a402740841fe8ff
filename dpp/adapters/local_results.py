"""Results on local disk (SPEC §5): the ``ResultStore`` port over a directory.

One file per result, ``<root>/<key>``: a first line holding the receipt as JSON
(``content_type`` and the metadata ``actual-cost-usd-micros``, ``run-id``,
``sha256``), then the body's bytes. A result and its receipt are therefore one
write with one commit point: a temporary file in the same directory
(``.tmp-<random>``), written, fsynced, renamed over the key, and the directory
fsynced. A reader (the reconciler's ``head``, a download) sees the whole
result with its receipt or nothing — never a body without its receipt, nor a
receipt of another body — exactly as an S3 PUT behaves, so the reconciler's
roll-forward / roll-back works unchanged. A crash leaves at most a temporary
file, which ``open_local_results`` removes once it is older than any write can
take (another replica on a shared volume may be writing its own right now).

Download links are DPP's own ``/v1/results/{token}``: the token names the key
and an expiry, signed with HMAC-SHA256 under ``DPP_RESULT_SIGNING_KEY``
(``ResultTokens``); verifying it compares in constant time, and only a key
this process could have signed (``results/<tenant id>/<run id>``) is ever
turned into a path, which must also stay under the root.

Blocking file calls run in worker threads (``anyio.to_thread``). Writes are
group-committed (``_GroupWriter``): puts that arrive while every batch slot is
busy go together in the next batch, one worker-thread call that writes each
file, fsyncs and renames it, then fsyncs each directory once. One thread hop
and one directory fsync per batch instead of per result: with a thread per
put, 16 concurrent puts cost the replica ~0.8-1.1 ms of CPU each (threads
contending for the GIL); batched, ~0.15-0.2 ms. Each put still returns only
once its own file and directory are durable, and fails alone: one result's
error is never another's.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import os
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import anyio
import orjson

from dpp.adapters.blobs import StoredObject

TEMP_PREFIX = ".tmp-"
# A temporary file older than this is from a dead writer: the run actor gives a
# finalize 60 s (dpp.actors.run.FINALIZE_DEADLINE_S), so ten times that is safe.
TEMP_STALE_SEC = 600
# The receipt line is a few hundred bytes; anything longer is not one of ours.
RECEIPT_LINE_BYTES_MAX = 4_096
# Keys as dpp.actors.run.result_key builds them; nothing else becomes a path.
KEY_PATTERN = re.compile(r"results/ten_[A-Za-z0-9]{1,64}/run_[A-Za-z0-9]{1,64}")
TOKEN_VERSION = "r1"
TOKEN_CHARS_MAX = 512
SIGNING_KEY_BYTES_MIN = 32
DOWNLOAD_PATH = "/v1/results/"
# A download reads the body in chunks this large (one chunk held at a time).
DOWNLOAD_CHUNK_BYTES = 256 * 1024
# Tokens kept for reuse: a token is a pure function of (key, expiry second), so a
# run polled many times a second is signed once per second. Cleared when full.
SIGNED_TOKENS_CACHED = 1_024
# Group commit of result files: results per worker-thread call, at most, and
# calls at once (their fsyncs overlap in the file system's journal).
WRITE_BATCH_MAX = 64
WRITE_BATCHES_MAX = 4


class ResultFileCorrupt(Exception):
    """A result file whose receipt line cannot be read: evidence that is unreadable
    (the reconciler counts it and, if it persists, sets the run aside)."""


class TokenRefused(Exception):
    """A download token that is malformed, tampered with or signed by another key."""


class TokenExpired(TokenRefused):
    """A genuine download token past its expiry."""


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise TokenRefused("not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise TokenRefused("not base64url") from None
    # one spelling per token: a last character differing only in unused bits is refused
    if _b64encode(data) != text:
        raise TokenRefused("not canonical base64url")
    return data


@dataclass(frozen=True, slots=True)
class ResultTokens:
    """Signs and verifies download tokens: ``r1.<base64url(expiry:key)>.<base64url(mac)>``."""

    signing_key: bytes
    expiry_sec: int
    # (expiry, key) -> token: what ``sign`` would compute again, byte for byte
    _signed: dict[tuple[int, str], str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        assert len(self.signing_key) >= SIGNING_KEY_BYTES_MIN, "signing key too short"
        assert self.expiry_sec > 0

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(
            self.signing_key, TOKEN_VERSION.encode() + b"." + payload, "sha256"
        ).digest()

    def sign(self, key: str, *, now: float | None = None) -> str:
        assert KEY_PATTERN.fullmatch(key), key
        expires = int((time.time() if now is None else now) + self.expiry_sec)
        token = self._signed.get((expires, key))
        if token is None:
            payload = f"{expires}:{key}".encode("ascii")
            token = f"{TOKEN_VERSION}.{_b64encode(payload)}.{_b64encode(self._mac(payload))}"
            if len(self._signed) >= SIGNED_TOKENS_CACHED:
                self._signed.clear()  # past seconds' tokens: never asked for again
            self._signed[(expires, key)] = token
        return token

    def verify(self, token: str, *, now: float | None = None) -> str:
        """The key a genuine, unexpired token names; ``TokenRefused`` (or its
        ``TokenExpired``) otherwise. The signature is checked before anything
        in the payload is believed."""
        if len(token) > TOKEN_CHARS_MAX:
            raise TokenRefused("too long")
        version, _, rest = token.partition(".")
        encoded_payload, _, encoded_mac = rest.partition(".")
        if version != TOKEN_VERSION or not encoded_payload or not encoded_mac:
            raise TokenRefused("malformed")
        payload, mac = _b64decode(encoded_payload), _b64decode(encoded_mac)
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise TokenRefused("bad signature")
        expires_text, _, key = payload.decode("ascii", "replace").partition(":")
        # signed by us, so well-formed; asserted all the same before it names a file
        if not expires_text.isdigit() or not KEY_PATTERN.fullmatch(key):
            raise TokenRefused("malformed payload")
        if int(expires_text) <= (time.time() if now is None else now):
            raise TokenExpired("expired")
        return key


class OpenedResult:
    """A result file opened for a download, positioned at its body. ``chunks``
    reads the body (or a part of it: a range request) piece by piece in worker
    threads, so a download holds one chunk in memory however large the result,
    and closes the file when it ends or stops (the client gone); ``read_whole``
    reads it at once (``get``); ``close`` closes a file no body was read from
    (a refused range). The open file keeps its bytes: retention deleting the
    result meanwhile does not cut a download short."""

    def __init__(self, file: BinaryIO, size: int, content_type: str, sha256: str) -> None:
        self._file = file
        self._body_offset = file.tell()
        self.size = size
        self.content_type = content_type
        self.sha256 = sha256

    async def chunks(self, first: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        """Bytes ``first`` .. ``first + length - 1`` of the body (to its end when
        ``length`` is None)."""
        try:
            assert 0 <= first <= self.size, (first, self.size)
            remaining = self.size - first if length is None else length
            assert 0 <= remaining <= self.size - first, (first, length, self.size)
            if first:
                await anyio.to_thread.run_sync(self._file.seek, self._body_offset + first)
            while remaining > 0:
                chunk = await anyio.to_thread.run_sync(
                    self._file.read, min(DOWNLOAD_CHUNK_BYTES, remaining)
                )
                if not chunk:
                    raise ResultFileCorrupt("the result file is shorter than when it was opened")
                remaining -= len(chunk)
                yield chunk
        finally:
            self.close()

    def read_whole(self) -> bytes:
        """The whole body, then the file closed (blocking: call it in a thread)."""
        with self._file:
            return self._file.read(self.size)

    def close(self) -> None:
        self._file.close()


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _ensure_directory(root: Path, directory: Path) -> None:
    """Create ``directory`` (under ``root``) durably: each new level's parent is fsynced."""
    missing: list[Path] = []
    current = directory
    while current != root and not current.is_dir():
        missing.append(current)
        current = current.parent
    for level in reversed(missing):
        with contextlib.suppress(FileExistsError):
            level.mkdir(mode=0o700)
        _fsync_directory(level.parent)


def _open_temporary(directory: Path, chunks: tuple[bytes, ...]) -> tuple[Path, BinaryIO]:
    """A new temporary file in ``directory`` holding ``chunks``, still open
    (written, not yet fsynced)."""
    temporary = directory / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    file = os.fdopen(descriptor, "wb")
    try:
        for chunk in chunks:
            file.write(chunk)
        file.flush()
    except BaseException:
        file.close()
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    return temporary, file


@dataclass(eq=False, slots=True)
class _QueuedWrite:
    """One put waiting for its batch: where, what, and how it went."""

    key: str
    chunks: tuple[bytes, ...]
    # set when the entry is written (or failed), or handed a batch to write
    woken: anyio.Event = field(default_factory=anyio.Event)
    # the batch this entry writes (itself first), when it is handed one
    batch: list[_QueuedWrite] | None = None
    durable: bool = False  # its file and its directory are fsynced
    error: BaseException | None = None


def _write_batch(root: Path, entries: list[_QueuedWrite]) -> None:
    """Write each entry's file durably, in worker-thread phases: every file
    written to a temporary; each temporary fsynced, then renamed over its key;
    each directory fsynced once. What a batch saves is worker-thread calls
    and directory fsyncs; the files' own fsyncs are not shared (measured on
    this workplace's ext4 on virtio, 2026-12-03: eight 300-byte files ~9 ms,
    eight times one file's ~1.1 ms; ~7 ms with the fsyncs spread over
    threads, and 16 slots instead of 4 moved echo runs within noise). A
    failure is recorded on its entry, whose temporary is removed, and the
    others go on; a directory whose fsync fails fails its entries."""
    checked: set[Path] = set()  # directories created, resolved and checked
    opened: list[tuple[_QueuedWrite, Path, BinaryIO]] = []
    for entry in entries:
        try:
            assert KEY_PATTERN.fullmatch(entry.key), f"not a result key: {entry.key!r}"
            directory = (root / entry.key).parent
            if directory not in checked:
                _ensure_directory(root, directory)
                # the pattern admits no '..': a symlinked directory is all that
                # could lead out, and it is refused (the file itself is renamed
                # into place, which replaces a link and never follows it)
                assert directory.resolve().is_relative_to(root), entry.key
                checked.add(directory)
            temporary, file = _open_temporary(directory, entry.chunks)
            opened.append((entry, temporary, file))
        except Exception as error:
            entry.error = error
    renamed: list[tuple[_QueuedWrite, Path]] = []
    for entry, temporary, file in opened:
        try:
            with file:
                os.fsync(file.fileno())
            os.replace(temporary, root / entry.key)
            renamed.append((entry, temporary.parent))
        except Exception as error:
            entry.error = error
            with contextlib.suppress(OSError):
                temporary.unlink()
    failed: dict[Path, Exception] = {}
    for directory in {directory for _, directory in renamed}:
        try:
            _fsync_directory(directory)
        except Exception as error:
            failed[directory] = error
    for entry, directory in renamed:
        if directory in failed:
            entry.error = failed[directory]
        else:
            entry.durable = True


class _GroupWriter:
    """Group commit for result files. Up to ``batches_max`` batches are written
    at once (each in its own worker thread: their fsyncs overlap); a put that
    finds every slot busy queues, and a slot whose batch is done takes up to
    ``batch_max`` of the queue at once and hands them, as the next batch, to the
    first of them to write (``_write``). Taking them out of the queue in the
    same step is what keeps one slot one batch: two slots freed before the
    first handed-over put runs hand over two different batches. Waiting is
    shielded: a put, like the single thread call it replaces, is never
    abandoned half-way (the run actor bounds its whole finalize)."""

    def __init__(
        self,
        root: Path,
        *,
        batch_max: int = WRITE_BATCH_MAX,
        batches_max: int = WRITE_BATCHES_MAX,
    ) -> None:
        assert batch_max >= 1 and batches_max >= 1
        self._root = root
        self._batch_max = batch_max
        self._batches_max = batches_max
        # puts waiting for a batch; only while every slot is busy
        self._queue: list[_QueuedWrite] = []
        self._writing = 0  # slots whose batch is being written, or handed over

    async def write(self, key: str, chunks: tuple[bytes, ...]) -> None:
        """Put ``key`` durably; raises what writing it raised."""
        entry = _QueuedWrite(key, chunks)
        with anyio.CancelScope(shield=True):
            if self._writing < self._batches_max:
                assert not self._queue, "puts queue only while every slot is busy"
                self._writing += 1
                entry.batch = [entry]
            else:
                self._queue.append(entry)
                await entry.woken.wait()
            if entry.batch is not None:
                await self._write(entry.batch)
        if entry.error is not None:
            raise entry.error
        assert entry.durable, "a put returns once its result is durable"

    async def _write(self, batch: list[_QueuedWrite]) -> None:
        """Write ``batch`` in one worker-thread call, answer its entries, then
        hand this slot the next batch from the queue, or free it."""
        try:
            await anyio.to_thread.run_sync(_write_batch, self._root, batch)
        finally:
            for entry in batch:
                if not (entry.durable or entry.error):
                    entry.error = OSError("the result batch did not finish writing")
                entry.woken.set()
            if self._queue:
                following = self._queue[: self._batch_max]
                del self._queue[: len(following)]
                following[0].batch = following
                following[0].woken.set()
            else:
                self._writing -= 1


def _parse_receipt(head: bytes, name: str) -> tuple[dict[str, object], int]:
    """The receipt line at the start of a result file, and where the body begins."""
    end = head.find(b"\n", 0, RECEIPT_LINE_BYTES_MAX + 1)
    if end < 0:
        raise ResultFileCorrupt(f"{name}: no receipt line")
    try:
        receipt = orjson.loads(head[:end])
    except orjson.JSONDecodeError:
        raise ResultFileCorrupt(f"{name}: the receipt line is not JSON") from None
    if not isinstance(receipt, dict):
        raise ResultFileCorrupt(f"{name}: the receipt line is not an object")
    return receipt, end + 1


def _read_receipt(path: Path) -> tuple[dict[str, object], int, int] | None:
    """The receipt, where the body begins and the file's size; None when absent."""
    try:
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            head = file.read(RECEIPT_LINE_BYTES_MAX + 1)
    except FileNotFoundError:
        return None
    receipt, offset = _parse_receipt(head, path.name)
    return receipt, offset, size


def _stored_object(key: str, receipt: dict[str, object], body_bytes: int) -> StoredObject:
    content_type = receipt.get("content_type")
    metadata = receipt.get("metadata")
    if not isinstance(content_type, str) or not isinstance(metadata, dict):
        raise ResultFileCorrupt(f"{key}: the receipt lacks content_type or metadata")
    return StoredObject(
        key=key,
        bytes=body_bytes,
        content_type=content_type,
        metadata={str(k).lower(): str(v) for k, v in metadata.items()},
    )


def remove_stale_temporaries(root: Path, *, older_than_sec: float = TEMP_STALE_SEC) -> int:
    """Delete ``.tmp-*`` files a dead writer left; answer how many."""
    removed = 0
    cutoff = time.time() - older_than_sec
    for directory, _, files in os.walk(root):
        for name in files:
            if not name.startswith(TEMP_PREFIX):
                continue
            path = Path(directory, name)
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
    return removed


class LocalResults:
    """``ResultStore`` over a directory; ``open_signed`` serves a download token."""

    def __init__(self, root: Path, tokens: ResultTokens) -> None:
        assert root.is_absolute(), root
        self.root = root
        self.tokens = tokens
        self.presign_expiry_sec = tokens.expiry_sec
        self._writer = _GroupWriter(root)

    def _path(self, key: str) -> Path:
        """The file of ``key`` (called in a worker thread: it resolves symlinks)."""
        assert KEY_PATTERN.fullmatch(key), f"not a result key: {key!r}"
        path = self.root / key
        # the pattern admits no '..' and exactly two '/': asserted again on the real path
        assert path.resolve().is_relative_to(self.root), key
        return path

    async def ping(self) -> None:
        await anyio.to_thread.run_sync(self._ping)

    def _ping(self) -> None:
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise OSError(f"results directory {self.root} is not writable")

    async def put(self, key: str, body: bytes, content_type: str, metadata: dict[str, str]) -> None:
        receipt = orjson.dumps({"content_type": content_type, "metadata": metadata}) + b"\n"
        assert len(receipt) <= RECEIPT_LINE_BYTES_MAX, "receipt line too long"
        await self._writer.write(key, (receipt, body))

    async def head(self, key: str) -> StoredObject | None:
        answer = await anyio.to_thread.run_sync(lambda: _read_receipt(self._path(key)))
        if answer is None:
            return None
        receipt, offset, size = answer
        return _stored_object(key, receipt, size - offset)

    async def get(self, key: str) -> bytes:
        body = await anyio.to_thread.run_sync(self._read, key)
        if body is None:
            raise FileNotFoundError(key)
        return body

    def _read(self, key: str) -> bytes | None:
        opened = self._open(key)
        return None if opened is None else opened.read_whole()

    async def delete(self, key: str) -> None:
        await anyio.to_thread.run_sync(self._delete, key)

    def _delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        _fsync_directory(path.parent)

    async def presigned_get(self, key: str, *, base_url: str | None = None) -> str:
        """``<base_url>/v1/results/<token>``; a path alone when no base URL is known."""
        path = DOWNLOAD_PATH + self.tokens.sign(key)
        return (base_url or "").rstrip("/") + path

    async def open_signed(self, token: str) -> OpenedResult | None:
        """The result a download token names, opened; ``TokenRefused`` /
        ``TokenExpired`` for a bad token, None when the result is gone
        (retention, or deleted)."""
        key = self.tokens.verify(token)
        return await anyio.to_thread.run_sync(self._open, key)

    def _open(self, key: str) -> OpenedResult | None:
        try:
            file = self._path(key).open("rb")
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(file.fileno()).st_size
            receipt, offset = _parse_receipt(file.read(RECEIPT_LINE_BYTES_MAX + 1), key)
            stored = _stored_object(key, receipt, size - offset)
            file.seek(offset)
        except BaseException:
            file.close()
            raise
        sha256 = stored.metadata.get("sha256", "")
        return OpenedResult(file, stored.bytes, stored.content_type, sha256)


async def open_local_results(
    directory: str, signing_key: str, presign_expiry_sec: int
) -> LocalResults:
    """The store under ``directory`` (created if missing), stale temporaries removed."""

    def prepare() -> Path:
        root = Path(directory).resolve()
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not os.access(root, os.W_OK | os.X_OK):
            raise PermissionError(f"{root} is not writable")
        remove_stale_temporaries(root)
        return root

    root = await anyio.to_thread.run_sync(prepare)
    return LocalResults(root, ResultTokens(signing_key.encode("utf-8"), presign_expiry_sec))
