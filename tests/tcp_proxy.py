"""A TCP proxy the fault tests put between a served replica and one dependency.

``TcpProxy(host, port)`` listens on a free loopback port and forwards every
connection to ``host:port``. ``cut()`` aborts every forwarded connection (both
sides see a reset) and stops listening, so new connections are *refused*, as
when the server is down; ``restore()`` listens again on the same port. The
replica under test only ever knows the proxy's address.

``drop_answers(n)`` loses the next ``n`` answers in transit: the request
reaches the upstream, which acts on it, but the first bytes of its answer
reset the client's connection instead of reaching it (a client's view of a
load balancer or network failing after the server committed). The client
tests put it in front of a ``dpp serve`` to prove a retried submit makes one
run.

asyncio only (it runs in the test's event loop, beside the load it drives).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

CHUNK_BYTES = 65_536


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class TcpProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.port = _free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections_total = 0
        self.cuts_total = 0
        self.answers_dropped_total = 0
        self._answers_to_drop = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def up(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        assert self._server is None, "already listening"
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )

    async def cut(self) -> None:
        """Reset every open connection and refuse new ones until ``restore``."""
        assert self._server is not None, "already cut"
        server, self._server = self._server, None
        server.close()
        self.cuts_total += 1
        self._abort_all()
        await asyncio.sleep(0)

    def drop_answers(self, count: int = 1) -> None:
        """Lose the next ``count`` answers (upstream to client) in transit."""
        assert count >= 0, count
        self._answers_to_drop += count

    async def restore(self) -> None:
        await self.start()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self._abort_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @contextlib.asynccontextmanager
    async def outage(self) -> AsyncIterator[None]:
        """``async with proxy.outage(): ...`` — down inside the block, up after."""
        await self.cut()
        try:
            yield
        finally:
            await self.restore()

    def _abort_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter):
        if self._server is None:  # accepted in the instant of a cut
            client.transport.abort()
            return
        try:
            upstream_reader, upstream = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            client.transport.abort()
            return
        if self._server is None:
            client.transport.abort()
            upstream.transport.abort()
            return
        self.connections_total += 1
        self._writers |= {client, upstream}
        pumps = [
            asyncio.ensure_future(self._pump(client_reader, upstream)),
            asyncio.ensure_future(self._pump_answers(upstream_reader, client, upstream)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._tasks.difference_update(pumps)
            for writer in (client, upstream):
                self._writers.discard(writer)
                writer.transport.abort()

    async def _pump_answers(
        self,
        reader: asyncio.StreamReader,
        client: asyncio.StreamWriter,
        upstream: asyncio.StreamWriter,
    ) -> None:
        """Upstream to client, losing an answer when ``drop_answers`` asked for it."""
        try:
            while chunk := await reader.read(CHUNK_BYTES):
                if self._answers_to_drop > 0:
                    self._answers_to_drop -= 1
                    self.answers_dropped_total += 1
                    return  # the finally resets the client: it never sees a byte
                client.write(chunk)
                await client.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            client.transport.abort()
            upstream.transport.abort()

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(CHUNK_BYTES):
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            # one side ended: end both, as a dead server would
            writer.transport.abort()


@contextlib.asynccontextmanager
async def proxy_to(url: str) -> AsyncIterator[TcpProxy]:
    """A started ``TcpProxy`` in front of the host and port of ``url`` (a
    database, Redis or HTTP address), closed when the block ends."""
    parts = urlsplit(url)
    assert parts.hostname and parts.port, url
    proxy = TcpProxy(parts.hostname, parts.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()
