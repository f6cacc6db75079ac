"""The writer's Prometheus metrics (docs/operations.md#metrics), updated once per batch, never per event."""

from __future__ import annotations

import time
from collections.abc import Iterable

from kiln_observability import LATENCY_BUCKETS, Collected, gauge
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import Metric

BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000)


class WriterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter("kiln_writer_events_written_total", "Events committed to SQL.", ["stream"],
                              registry=registry)
        self.points = Counter("kiln_writer_points_written_total", "Metric values committed to SQL (one per metric "
                              "of each metrics and epoch event).", registry=registry)
        self.batch = Histogram("kiln_writer_batch_size_events", "Events per committed batch.", ["stream"],
                               buckets=BATCH_BUCKETS, registry=registry)
        self.commit = Histogram("kiln_writer_commit_duration_seconds", "Time to write and commit one batch.",
                                ["stream"], buckets=LATENCY_BUCKETS, registry=registry)
        self.dead = Counter("kiln_writer_dead_letters_total", "Events dead-lettered (invalid, or refused by the "
                            "database).", ["stream"], registry=registry)
        self.retries = Counter("kiln_writer_write_retries_total", "Batch writes that failed and are retried "
                               "(database unreachable or slow).", ["stream"], registry=registry)
        self.last_commit: float | None = None  # time.time() of the last commit
        for stream in ("KILN_EVENTS", "KILN_LOGS"):  # known series start at 0, so that rate() sees their first rise
            for counter in (self.events, self.dead, self.retries):
                counter.labels(stream)
        Collected(self._ages, registry)

    def committed(self, stream: str, events: int, points: int, seconds: float) -> None:
        self.events.labels(stream).inc(events)
        if points:
            self.points.inc(points)
        self.batch.labels(stream).observe(events)
        self.commit.labels(stream).observe(seconds)
        self.last_commit = time.time()

    def _ages(self) -> Iterable[Metric]:
        last = self.last_commit
        yield gauge("kiln_writer_last_commit_timestamp_seconds", "Unix time of the last commit (0: none yet).",
                    last or 0.0)
        yield gauge("kiln_writer_last_commit_age_seconds", "Seconds since the last commit (NaN: none yet).",
                    time.time() - last if last is not None else float("nan"))
