"""Prometheus building blocks shared by the services: a registry per service, rendering, scrape-time values, and
counters/histograms cheap enough for a per-message hot path.

Each service builds its own :func:`new_registry` in its composition root (never the global one), so several
services, or several instances of one, can live in one process (the tests run notifiers and APIs in-process).

``prometheus_client``'s ``Counter.inc`` takes a lock (about 0.9 µs on the development machine, ``Histogram.observe``
1.8 µs).  That is nothing per batch or per HTTP request; per WebSocket message and client it is not, so
:class:`LoopCounter` and :class:`LoopHistogram` keep plain numbers, updated only from the service's event loop
thread, and hand them to the registry when it is scraped.

Example:
    >>> reg = new_registry(process=False)
    >>> sent = LoopCounter("kiln_demo_messages_sent_total", "Messages sent.", ("kind",), registry=reg)
    >>> sent.inc("live"); sent.inc("live", amount=2)
    >>> b"kiln_demo_messages_sent_total{kind=\\"live\\"} 3.0" in render(reg)[0]
    True
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds: HTTP requests, commits, claims, spawns, WebSocket delivery."""


def new_registry(process: bool = True) -> CollectorRegistry:
    """A registry for one service; with ``process``, the standard ``process_*``, ``python_*`` metrics too.

    Counters and histograms get no ``*_created`` series (process-wide: they double the series for no use here).
    """
    disable_created_metrics()
    registry = CollectorRegistry()
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The Prometheus text exposition of ``registry`` and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


class Collected:
    """Metric families computed when the registry is scraped, by ``collect()`` (a gauge of slots, an age)."""

    def __init__(self, collect: Callable[[], Iterable[Metric]], registry: CollectorRegistry | None = None) -> None:
        self._collect = collect
        if registry is not None:
            registry.register(self)

    def collect(self) -> Iterable[Metric]:
        return list(self._collect())


def gauge(name: str, doc: str, values: dict[tuple[str, ...], float] | float,
          labels: Sequence[str] = ()) -> GaugeMetricFamily:
    """A gauge family from a number, or from ``{label values: number}``."""
    family = GaugeMetricFamily(name, doc, labels=list(labels) if labels else None)
    if isinstance(values, dict):
        for key, value in values.items():
            family.add_metric(list(key), value)
    else:
        family.add_metric([], values)
    return family


class LoopCounter:
    """A counter with labels, kept as plain numbers: update it only from one thread (the event loop's)."""

    def __init__(self, name: str, doc: str, labels: Sequence[str] = (), *,
                 registry: CollectorRegistry | None = None) -> None:
        self.name, self.doc, self.labels = name.removesuffix("_total"), doc, tuple(labels)
        self.values: dict[tuple[str, ...], float] = {}
        if registry is not None:
            registry.register(self)

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        """``inc("live")``, ``inc("live", amount=3)``: label values as strings, in the order of ``labels``."""
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self.values.get(labels, 0.0)

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.name, self.doc, labels=list(self.labels))
        for key, value in list(self.values.items()):
            family.add_metric(list(key), value)
        return [family]


class LoopHistogram:
    """A histogram without labels, kept as plain numbers: update it only from one thread (the event loop's)."""

    def __init__(self, name: str, doc: str, buckets: Sequence[float] = LATENCY_BUCKETS, *,
                 registry: CollectorRegistry | None = None) -> None:
        self.name, self.doc = name, doc
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        if registry is not None:
            registry.register(self)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # bucket i holds bounds[i-1] < value <= bounds[i]
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def collect(self) -> Iterable[Metric]:
        cumulative, buckets = 0, []
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == math.inf else repr(float(bound)), cumulative))
        return [HistogramMetricFamily(self.name, self.doc, buckets=buckets, sum_value=self.sum)]
