"""JetStream's own state, read from the server through the JetStream API and exposed as gauges.

Each service reports the streams it uses and the durable consumers it owns (the writer its two durables, a runner
its pool's work queue), with the ``STREAM.INFO`` and ``CONSUMER.INFO`` rights its NATS identity already has: no
monitoring port, no extra credentials, no exporter to run.  Several services report the same stream: the values
are the server's, so ``max by (stream)`` in PromQL.  The state is read every ``every_s`` in the background and
served from the last reading, so a scrape never waits on NATS.

Example:
    >>> from types import SimpleNamespace as NS
    >>> class FakeJS:
    ...     async def stream_info(self, name):
    ...         return NS(state=NS(messages=3, bytes=120, consumer_count=2))
    ...     async def consumer_info(self, stream, name):
    ...         return NS(num_pending=5, num_ack_pending=1, num_redelivered=0, num_waiting=1)
    >>> import asyncio
    >>> stats = JetStreamStats(FakeJS(), ["KILN_EVENTS"], [("KILN_EVENTS", "metrics-writer-events")])
    >>> asyncio.run(stats.refresh())
    >>> stats.consumers[("KILN_EVENTS", "metrics-writer-events")]["pending"]
    5
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric

from .metrics import gauge

log = logging.getLogger("kiln.jetstream")
STREAM_FIELDS = (("messages", "Messages stored in the stream."), ("bytes", "Bytes stored in the stream."),
                 ("consumers", "Consumers of the stream."))
CONSUMER_FIELDS = (
    ("pending_messages", "pending", "Messages of the durable's filter not delivered yet (its backlog)."),
    ("ack_pending_messages", "ack_pending", "Messages delivered and not acknowledged yet."),
    ("redelivered_messages", "redelivered", "Messages delivered more than once and not acknowledged yet."),
    ("waiting_pulls", "waiting", "Pull requests waiting on the durable."),
)


class JetStreamStats:
    """Reads ``streams`` and ``consumers`` ((stream, durable) pairs) with ``js`` and collects them as gauges."""

    def __init__(self, js: Any, streams: Sequence[str], consumers: Sequence[tuple[str, str]], *,
                 every_s: float = 5.0, registry: CollectorRegistry | None = None) -> None:
        self.js, self.every_s = js, every_s
        self.stream_names, self.consumer_names = tuple(streams), tuple(consumers)
        self.streams: dict[str, dict[str, int]] = {}
        self.consumers: dict[tuple[str, str], dict[str, int]] = {}
        self.read_at: float | None = None
        self.errors = 0
        if registry is not None:
            registry.register(self)

    async def refresh(self) -> None:
        """Read every stream and durable once; one that cannot be read is left out until it can."""
        for name in self.stream_names:
            try:
                state = (await self.js.stream_info(name)).state
                self.streams[name] = {"messages": int(state.messages), "bytes": int(state.bytes),
                                      "consumers": int(state.consumer_count)}
            except Exception as exc:  # noqa: BLE001 - missing, no right, or NATS away: reported as an error count
                self.streams.pop(name, None)
                self._failed(f"stream {name}", exc)
        for stream, durable in self.consumer_names:
            try:
                info = await self.js.consumer_info(stream, durable)
                self.consumers[(stream, durable)] = {
                    "pending": int(info.num_pending or 0), "ack_pending": int(info.num_ack_pending or 0),
                    "redelivered": int(info.num_redelivered or 0), "waiting": int(info.num_waiting or 0)}
            except Exception as exc:  # noqa: BLE001 - as above (a durable is created once its service has started)
                self.consumers.pop((stream, durable), None)
                self._failed(f"consumer {stream}/{durable}", exc)
        self.read_at = time.monotonic()

    def _failed(self, what: str, exc: Exception) -> None:
        self.errors += 1
        log.debug("cannot read %s: %r", what, exc)

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh every ``every_s`` until ``stop`` is set."""
        while not stop.is_set():
            await self.refresh()
            try:
                await asyncio.wait_for(stop.wait(), self.every_s)
            except TimeoutError:
                pass

    def collect(self) -> Iterable[Metric]:
        out: list[Metric] = []
        for field, doc in STREAM_FIELDS:
            out.append(gauge(f"kiln_jetstream_stream_{field}", doc,
                             {(s,): v[field] for s, v in self.streams.items()}, ("stream",)))
        for suffix, field, doc in CONSUMER_FIELDS:
            out.append(gauge(f"kiln_jetstream_consumer_{suffix}", doc,
                             {k: v[field] for k, v in self.consumers.items()}, ("stream", "consumer")))
        age = time.monotonic() - self.read_at if self.read_at is not None else float("nan")
        out.append(gauge("kiln_jetstream_state_age_seconds", "Seconds since the JetStream state above was read.",
                         age))
        errors = CounterMetricFamily("kiln_jetstream_state_read_errors", "Stream or consumer reads that failed.")
        errors.add_metric([], self.errors)
        out.append(errors)
        return out
