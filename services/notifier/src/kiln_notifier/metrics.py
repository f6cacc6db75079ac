"""The notifier's Prometheus metrics (docs/operations.md#metrics).

Counted per message and client on the live path, so kept as plain numbers (:class:`~kiln_observability.LoopCounter`,
no lock) and read when ``/metrics`` is scraped; everything runs on the server's one event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from kiln_observability import Collected, LoopCounter, LoopHistogram, gauge
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

SEND_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class NotifierMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.sent = LoopCounter("kiln_notifier_messages_sent_total", "WebSocket messages sent, by kind (live: an "
                                "event from a shared feed; replay: history from the client's cursor; control: "
                                "authorized, subscribed, errors...).", ("kind",), registry=registry)
        self.connections = LoopCounter("kiln_notifier_connections_total", "WebSockets accepted.", registry=registry)
        self.cut_off = LoopCounter("kiln_notifier_clients_cut_off_total", "Clients closed (1013) because they read "
                                   "too slowly: their queue overflowed; they resume from their cursor.",
                                   registry=registry)
        self.latency = LoopHistogram("kiln_notifier_publish_to_send_seconds", "From an event's storage in "
                                     "JetStream to its WebSocket send, live events only (server and notifier "
                                     "clocks).", SEND_BUCKETS, registry=registry)
        for kind in ("live", "replay", "control"):  # known series start at 0, so that rate() sees their first rise
            self.sent.inc(kind, amount=0)
        self.connections.inc(amount=0)
        self.cut_off.inc(amount=0)
        self.clients = 0
        self.feeds: Callable[[], int] = lambda: 0
        Collected(self._state, registry)

    def _state(self) -> Iterable[Metric]:
        yield gauge("kiln_notifier_clients_connected", "WebSocket clients connected now.", self.clients)
        yield gauge("kiln_notifier_feeds", "Shared live feeds (one ordered consumer per watched subject).",
                    self.feeds())
