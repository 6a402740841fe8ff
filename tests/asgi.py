"""A request's ASGI scope, built by hand, for tests that call an app directly
(a raw path a client would normalise, a header a client would refuse to send,
or every message the app sends)."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote


def http_scope(
    method: str,
    raw_path: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    host: bytes = b"testserver",
) -> dict[str, Any]:
    """An HTTP/1.1 request for ``raw_path`` (sent as is; ``path`` is its decoded
    form, as a server gives it), with a Host header and then ``headers``."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(raw_path.decode("latin-1")),
        "raw_path": raw_path,
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", host), *(headers or [])],
        "client": ("127.0.0.1", 1234),
        "server": (host.decode("latin-1"), 80),
        "state": {},
    }
