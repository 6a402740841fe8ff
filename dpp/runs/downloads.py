"""Result downloads a local results store serves itself (SPEC §5, ``/v1/results/{token}``).

The token is the credential (no API key, like a presigned URL): the store
verifies its signature and expiry before anything it names is read. A bad
token is ``DownloadRefused`` (403), a result that is no longer there (deleted
by retention, or lost) ``DownloadGone`` (404), a disk that cannot be read
``DownloadUnavailable`` (503). With S3 results DPP serves no downloads: every
token is gone.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from dpp.adapters.local_results import (
    LocalResults,
    OpenedResult,
    ResultFileCorrupt,
    TokenExpired,
    TokenRefused,
)

log = logging.getLogger("dpp.results")


class DownloadRefused(Exception):
    """The token is malformed, tampered with, signed with another key, or expired."""

    def __init__(self, reason: str, *, expired: bool = False) -> None:
        super().__init__(reason)
        self.expired = expired


class DownloadGone(Exception):
    """A genuine token whose result no longer exists (retention deleted it)."""


class DownloadUnavailable(Exception):
    """The results directory could not be read now; retrying is safe."""


class Download:
    """An opened result of ``size`` bytes: ``stream`` sends it (whole, or the part
    a range request names), then closes the file; ``close`` closes a file
    whose body is not sent (a range refused). A download never started leaves
    its file to be closed with the response."""

    __slots__ = ("_opened", "content_type", "sha256", "size")

    def __init__(self, opened: OpenedResult) -> None:
        self._opened = opened
        self.size = opened.size
        self.content_type = opened.content_type
        self.sha256 = opened.sha256

    def stream(self, first: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        return self._opened.chunks(first, length)

    def close(self) -> None:
        self._opened.close()


class ResultDownloads:
    def __init__(self, store: LocalResults | None) -> None:
        self._store = store

    async def fetch(self, token: str) -> Download:
        if self._store is None:
            raise DownloadGone("results are not served by DPP (S3 store)")
        try:
            opened = await self._store.open_signed(token)
        except TokenExpired:
            raise DownloadRefused("expired", expired=True) from None
        except TokenRefused as refused:
            raise DownloadRefused(str(refused)) from None
        except ResultFileCorrupt:
            # evidence for the reconciler and the operator, not for this client
            log.error("a result file's receipt is unreadable", exc_info=True)
            raise DownloadGone("unreadable") from None
        except OSError as error:
            log.warning("could not read a result file", exc_info=True)
            raise DownloadUnavailable(type(error).__name__) from None
        if opened is None:
            raise DownloadGone("deleted")
        return Download(opened)
