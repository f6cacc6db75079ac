"""A small HTTP server for the services without one (runner, metrics-writer, ClearML forwarder).

``GET /metrics``, ``/livez``, ``/readyz`` (and ``/healthz``, an alias of ``/readyz``), served on the service's own
event loop: an answer proves the loop runs, which is what liveness means here.  HTTP/1.1, one request per
connection, nothing else; no dependency beyond asyncio.

Example:
    >>> import asyncio, urllib.request
    >>> async def demo():
    ...     server = await serve("127.0.0.1", 0, new_registry(process=False), Health())
    ...     url = f"http://127.0.0.1:{server.port}/livez"
    ...     body = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read())
    ...     await server.close()
    ...     return body
    >>> asyncio.run(demo())
    b'{"status": "alive"}'
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from prometheus_client import CollectorRegistry

from .health import Health, body
from .metrics import new_registry, render

__all__ = ["MetricsServer", "new_registry", "serve"]
log = logging.getLogger("kiln.health")
READ_TIMEOUT_S = 5.0
MAX_HEAD = 8192
JSON = "application/json"


class MetricsServer:
    """The running server; ``port`` is the one bound (useful with port 0)."""

    def __init__(self, server: asyncio.Server, registry: CollectorRegistry, health: Health) -> None:
        self.server, self.registry, self.health = server, registry, health
        self.port: int = server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2.0)

    async def answer(self, path: str) -> tuple[int, bytes, str]:
        """Status, body and content type for a GET of ``path``."""
        if path == "/metrics":
            data, ctype = render(self.registry)
            return 200, data, ctype
        if path == "/livez":
            return 200, json.dumps({"status": "alive"}).encode(), JSON
        if path in ("/readyz", "/healthz"):
            ok, checks = await self.health.ready()
            return (200 if ok else 503), json.dumps(body(ok, checks)).encode(), JSON
        return 404, b'{"detail": "not found"}', JSON

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            path = target.split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                status, data, ctype = 405, b'{"detail": "method not allowed"}', JSON
            else:
                status, data, ctype = await self.answer(path)
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}[status]
            writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\n"
                         "Connection: close\r\n\r\n".encode())
            if method != "HEAD":
                writer.write(data)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, ConnectionError):
            pass  # a client that sends nothing sensible gets the connection closed
        except Exception:
            log.exception("metrics server: request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def serve(host: str, port: int, registry: CollectorRegistry, health: Health) -> MetricsServer:
    """Start serving ``registry`` and ``health`` on ``host:port`` (0: a free port, see ``.port``)."""
    holder: list[MetricsServer] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await holder[0].handle(reader, writer)

    server = await asyncio.start_server(handle, host, port, limit=MAX_HEAD)
    holder.append(MetricsServer(server, registry, health))
    return holder[0]
