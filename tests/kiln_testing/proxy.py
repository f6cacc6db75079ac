"""A TCP proxy a test can sever and restore: puts one client (a runner, a writer) out of reach of its server while
everything else stays connected."""

from __future__ import annotations

import asyncio
import time

from kiln_local.stack import free_port


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target``. ``cut()`` closes every link and refuses new ones; ``start()``
    (again) restores it on the same port. Runs in the test's event loop."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.port = target, free_port()
        self.server: asyncio.base_events.Server | None = None
        self.links: set[asyncio.StreamWriter] = set()
        self.accepted = 0  # connections taken since the proxy was created (a reconnect shows here)
        self.last_accept = 0.0  # time.monotonic() of the latest

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> "TcpProxy":
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)
        return self

    async def cut(self) -> None:
        assert self.server
        self.server.close()  # nothing listens: connecting is refused
        for w in list(self.links):
            w.transport.abort()
        self.links.clear()
        await self.server.wait_closed()
        self.server = None

    async def close(self) -> None:
        if self.server:
            await self.cut()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        self.last_accept = time.monotonic()
        self.links |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self.links -= {writer, up_writer}

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()
