"""What a service's composition root holds for observability: its registry, its health, background readers, and
(for the services without an HTTP server) the small server that exposes them.

Example (a worker service's ``run``)::

    obs = Observability()
    obs.health.add("nats", nats_connected(nc))
    obs.watch_jetstream(nc.jetstream(), ["KILN_EVENTS"], [("KILN_EVENTS", "metrics-writer-events")])
    await obs.start(settings.metrics_host, settings.metrics_port)  # port None: no server, the readers still run
    ...
    obs.health.draining = True
    await obs.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry

from .health import Health
from .jetstream import JetStreamStats
from .metrics import new_registry
from .server import MetricsServer, serve

log = logging.getLogger("kiln.health")


class Observability:
    def __init__(self, registry: CollectorRegistry | None = None, health: Health | None = None) -> None:
        self.registry = registry if registry is not None else new_registry()
        self.health = health if health is not None else Health()
        self.server: MetricsServer | None = None
        self.jetstream: JetStreamStats | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def watch_jetstream(self, js: Any, streams: Sequence[str], consumers: Sequence[tuple[str, str]],
                        every_s: float = 5.0) -> JetStreamStats:
        """Expose these streams' and durables' state (read every ``every_s`` once started)."""
        self.jetstream = JetStreamStats(js, streams, consumers, every_s=every_s, registry=self.registry)
        return self.jetstream

    async def start(self, host: str | None = None, port: int | None = None) -> None:
        """Start the background readers, and the HTTP server when ``port`` is set (0: any free port, logged)."""
        if self.jetstream is not None:
            self._tasks.append(asyncio.create_task(self.jetstream.run(self._stop), name="jetstream-stats"))
        if port is not None:
            self.server = await serve(host or "127.0.0.1", port, self.registry, self.health)
            log.info("metrics and health on http://%s:%d (/metrics, /livez, /readyz)", host or "127.0.0.1",
                     self.server.port)

    async def stop(self) -> None:
        """Stop the readers and the server (last thing at shutdown: readiness answers until then)."""
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        if self.server is not None:
            await self.server.close()
            self.server = None
