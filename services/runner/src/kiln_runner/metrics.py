"""The runner's Prometheus metrics (docs/operations.md#metrics): counted at claims, spawns and attempt ends; slots,
trainers, heartbeat age and the dataset cache read from the runner's state when scraped."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from kiln_observability import LATENCY_BUCKETS, Collected, gauge
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, Metric

if TYPE_CHECKING:
    from .handlers import Runner


class RunnerMetrics:
    def __init__(self, registry: CollectorRegistry, pool: str) -> None:
        self.pool = pool
        self.claim = Histogram("kiln_runner_claim_duration_seconds", "From a start command's delivery to its claim "
                               "(running registry entry, cancel mark read, claim created).", ["pool"],
                               buckets=LATENCY_BUCKETS, registry=registry).labels(pool)
        self.spawn = Histogram("kiln_runner_spawn_duration_seconds", "Time to start a trainer process.", ["pool"],
                               buckets=LATENCY_BUCKETS, registry=registry).labels(pool)
        self.attempts = Counter("kiln_runner_attempts_total", "Attempts ended, by outcome (completed, failed, "
                                "cancelled, handed_back, fenced; lost: declared by this runner's reaper) and exit "
                                "class.", ["pool", "outcome", "exit_class"], registry=registry)
        self.retries = Counter("kiln_runner_retries_total", "Next attempts queued, by reason (failed: a retryable "
                               "failure; lost: the reaper).", ["pool", "reason"], registry=registry)
        for reason in ("failed", "lost"):  # known series start at 0, so that rate() sees their first increase
            self.retries.labels(pool, reason)
        self.runner: Runner | None = None
        Collected(self._state, registry)

    def ended(self, outcome: str, exit_class: str, pool: str | None = None) -> None:
        self.attempts.labels(pool or self.pool, outcome, exit_class).inc()

    def retried(self, reason: str, pool: str | None = None) -> None:
        self.retries.labels(pool or self.pool, reason).inc()

    def _state(self) -> Iterable[Metric]:
        runner = self.runner
        if runner is None:
            return
        key = (self.pool,)
        total = runner.settings.slots
        jobs = list(runner.jobs.values())
        yield gauge("kiln_runner_slots", "Slots (concurrent trainers) of this runner.", {key: total}, ["pool"])
        yield gauge("kiln_runner_slots_busy", "Slots holding an attempt.", {key: total - runner.slots.free}, ["pool"])
        yield gauge("kiln_runner_trainers_running", "Trainer processes running.",
                    {key: sum(1 for j in jobs if j.proc is not None and j.proc.returncode is None)}, ["pool"])
        now = time.monotonic()
        yield gauge("kiln_runner_last_heartbeat_age_seconds", "Seconds since the running attempt heard from least "
                    "recently got a heartbeat into JetStream (0: no attempt running).",
                    {key: max((now - j.last_beat for j in jobs), default=0.0)}, ["pool"])
        cache = runner.datasets
        for name, doc, value in (
                ("kiln_runner_dataset_cache_hits", "S3 dataset snapshots found in the cache.", cache.hits),
                ("kiln_runner_dataset_cache_misses", "S3 dataset snapshots downloaded (or tried).", cache.misses),
                ("kiln_runner_dataset_downloaded_bytes", "Bytes of S3 datasets downloaded.", cache.downloaded_bytes)):
            family = CounterMetricFamily(name, doc, labels=["pool"])
            family.add_metric([self.pool], value)
            yield family
