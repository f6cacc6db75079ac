"""Kiln trainer SDK: report metrics, progress, epochs and artifacts from any training loop.

The training thread only enqueues (about a microsecond); a background thread publishes to NATS JetStream with
acks, spools to disk while NATS is unreachable and replays in order.  Outside Kiln every call is a no-op (or a
local JSON-lines log with ``KILN_SDK_FILE``).

Example:
    >>> import kiln_sdk
    >>> with kiln_sdk.init(env={}) as run:          # env={}: as if outside Kiln
    ...     for step in range(3):
    ...         kiln_sdk.log_metrics(step, {"loss": 1.0 / (step + 1)})
    ...     kiln_sdk.log("done")

Module-level functions act on the current run, starting one with :func:`init` when there is none.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .context import JobContext
from .nats_reporter import NatsReporter
from .reporters import FileReporter, NullReporter, RecordingReporter, Reporter
from .run import Run, current, init

__all__ = [
    "FileReporter", "JobContext", "NatsReporter", "NullReporter", "RecordingReporter", "Reporter", "Run",
    "artifact", "current", "epoch", "finish", "flush", "init", "log", "log_metrics", "progress",
]


def _run() -> Run:
    return current() or init()


def log_metrics(step: int, metrics: Mapping[str, Any]) -> None:
    """:meth:`Run.log_metrics` on the current run."""
    _run().log_metrics(step, metrics)


def log(message: str) -> None:
    """:meth:`Run.log` on the current run."""
    _run().log(message)


def progress(epoch: int, epochs: int, batch: int, batches: int,
             images_per_s: float | None = None, eta_s: float | None = None) -> None:
    """:meth:`Run.progress` on the current run."""
    _run().progress(epoch, epochs, batch, batches, images_per_s, eta_s)


def epoch(epoch: int, epochs: int, metrics: Mapping[str, Any], epoch_time: float | None = None) -> None:
    """:meth:`Run.epoch` on the current run."""
    _run().epoch(epoch, epochs, metrics, epoch_time)


def artifact(path: str | os.PathLike[str], name: str | None = None, epoch: int | None = None) -> None:
    """:meth:`Run.artifact` on the current run."""
    _run().artifact(path, name, epoch)


def flush(timeout: float = 10.0) -> bool:
    """:meth:`Run.flush` on the current run (True when there is none)."""
    run = current()
    return run.flush(timeout) if run is not None else True


def finish(status: str = "completed", timeout: float | None = None) -> bool:
    """:meth:`Run.finish` on the current run (True when there is none)."""
    run = current()
    return run.finish(status, timeout) if run is not None else True
