"""Observability shared by every Kiln service: Prometheus metrics, liveness/readiness, structured logs.

- :mod:`.metrics`: a registry per service, scrape-time values, lock-free counters for hot paths.
- :mod:`.health`: readiness checks (NATS, database) and the draining flag.
- :mod:`.server`: ``/metrics``, ``/livez``, ``/readyz`` for the services without an HTTP server.
- :mod:`.jetstream`: stream and durable consumer state read from the server.
- :mod:`.logs`: text or JSON lines with the job context, secrets redacted.
- :mod:`.service`: the registry, health, readers and server of one service, started and stopped together.

docs/operations.md lists every metric, endpoint and setting.
"""

from .health import Health, database, nats_connected
from .jetstream import JetStreamStats
from .logs import job_context, redact, setup_logging
from .metrics import (
    LATENCY_BUCKETS,
    Collected,
    LoopCounter,
    LoopHistogram,
    gauge,
    new_registry,
    render,
)
from .server import MetricsServer, serve
from .service import Observability

__all__ = ["LATENCY_BUCKETS", "Collected", "Health", "JetStreamStats", "LoopCounter", "LoopHistogram",
           "MetricsServer", "Observability", "database", "gauge", "job_context", "nats_connected", "new_registry",
           "redact", "render", "serve", "setup_logging"]
