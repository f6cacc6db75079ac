"""The forwarder's Prometheus metrics (docs/operations.md#metrics)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from kiln_observability import Collected, gauge
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import Metric


class ForwarderMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.received = Counter("kiln_clearml_events_received_total", "Events fetched from JetStream and handed to "
                                "their job's lane.", ["stream"], registry=registry)
        self.dead = Counter("kiln_clearml_dead_letters_total", "Invalid events dead-lettered.", ["stream"],
                            registry=registry)
        self.operations = Counter("kiln_clearml_operations_total", "ClearML operations by result (ok; failed: "
                                  "retried with backoff; refused: skipped).", ["result"], registry=registry)
        self.acked = Counter("kiln_clearml_messages_acked_total", "Messages acknowledged once ClearML took them.",
                             registry=registry)
        self.active_jobs: Callable[[], int] = lambda: 0
        for result in ("ok", "failed", "refused"):  # known series start at 0, so that rate() sees their first rise
            self.operations.labels(result)
        for stream in ("KILN_EVENTS", "KILN_LOGS"):
            self.received.labels(stream)
            self.dead.labels(stream)
        Collected(self._state, registry)

    def _state(self) -> Iterable[Metric]:
        yield gauge("kiln_clearml_jobs_active", "Jobs with a lane (their ClearML task open) right now.",
                    self.active_jobs())
