"""A refusing proxy in front of moto's S3: the real service, with chosen requests
answered 403 AccessDenied (what a bucket policy or an IAM change does to one key).

moto cannot deny one object's HEAD or DELETE on its own; this proxy forwards
everything else untouched, so the code under test talks S3 over HTTP as always.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from hypercorn.asyncio import serve
from hypercorn.config import Config

ACCESS_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied</Message></Error>"
)


@dataclass
class RefusingProxy:
    url: str
    # (method, path) -> refuse?
    refuse: Callable[[str, str], bool] = lambda method, path: False
    refused: list[tuple[str, str]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def refusing_s3_proxy(upstream_url: str) -> AsyncIterator[RefusingProxy]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    proxy = RefusingProxy(f"http://127.0.0.1:{listener.getsockname()[1]}")
    stop = anyio.Event()

    async with httpx.AsyncClient(base_url=upstream_url, timeout=30) as upstream:

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return
            method, path = scope["method"], scope["path"]
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            if proxy.refuse(method, path):
                proxy.refused.append((method, path))
                await send(
                    {
                        "type": "http.response.start",
                        "status": 403,
                        "headers": [(b"content-type", b"application/xml")],
                    }
                )
                await send({"type": "http.response.body", "body": ACCESS_DENIED})
                return
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"host"]
            raw_path = scope.get("raw_path") or path.encode()
            query = scope.get("query_string", b"")
            target = raw_path.decode() + (("?" + query.decode()) if query else "")
            answer = await upstream.request(method, target, headers=headers, content=body)
            await send(
                {
                    "type": "http.response.start",
                    "status": answer.status_code,
                    "headers": [
                        (k.encode(), v.encode())
                        for k, v in answer.headers.items()
                        if k.lower() not in ("transfer-encoding", "content-encoding")
                    ],
                }
            )
            await send({"type": "http.response.body", "body": answer.content})

        config = Config()
        config.bind = [f"fd://{listener.fileno()}"]
        config.accesslog = None
        config.errorlog = None
        async with anyio.create_task_group() as group:
            group.start_soon(lambda: serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
            try:
                yield proxy
            finally:
                stop.set()
    with contextlib.suppress(OSError):  # hypercorn may have closed it already
        listener.close()
