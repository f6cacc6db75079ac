"""Turning SDK records into :class:`kiln_contracts.Event` envelopes (off the training thread where it matters).

A *record* is what the training thread enqueues: ``(kind, unix_time, fields)``.  It is cheap to build (no
validation, no serialization); :class:`EventFactory` validates it into a payload and wraps it in the envelope with
the next gap-free ``seq``.
"""

from __future__ import annotations

import math
import sys
import threading
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from kiln_contracts import (
    ArtifactStored,
    EpochCompleted,
    Event,
    LogBatch,
    LogLine,
    MetricsLogged,
    Progress,
)

Record = tuple[str, float, dict[str, Any]]
"""``(kind, time.time(), payload fields)`` as enqueued by :class:`kiln_sdk.Run`."""

MAX_LOG_LINES = 200
_warned: set[str] = set()
_warn_lock = threading.Lock()


def warn_once(key: str, message: str) -> None:
    """Print ``kiln_sdk: message`` to stderr the first time ``key`` is seen: SDK errors never reach training."""
    with _warn_lock:
        if key in _warned:
            return
        _warned.add(key)
    try:
        print(f"kiln_sdk: {message}", file=sys.stderr, flush=True)
    except Exception:  # noqa: BLE001 - stderr may be closed at exit
        pass


def clean_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Floats only: tensors/numpy scalars are converted; NaN/inf are left out.

    JSON has no NaN: pydantic would write ``null`` and every consumer would then reject the whole event, so a
    non-finite value is dropped (and said once on stderr) rather than poisoning the stream.
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            f = float(value)
        except (TypeError, ValueError):
            warn_once(f"type:{key}", f"metric {key!r} is not a number ({type(value).__name__}); left out")
            continue
        if math.isfinite(f):
            out[str(key)] = f
        else:
            warn_once(f"nan:{key}", f"metric {key!r} is {f} (not representable in JSON); left out where it occurs")
    return out


def _dt(t: float) -> datetime:
    return datetime.fromtimestamp(t, timezone.utc)


def build_payload(kind: str, t: float, fields: dict[str, Any]) -> Any:
    """Validate one record into its contract payload (raises ``pydantic.ValidationError`` on bad input)."""
    if kind == "metrics":
        return MetricsLogged(step=fields["step"], metrics=clean_metrics(fields["metrics"]),
                             coalesced=fields.get("coalesced", 0))
    if kind == "epoch":
        return EpochCompleted(**{**fields, "metrics": clean_metrics(fields["metrics"])})
    if kind == "progress":
        return Progress(**fields)
    if kind == "artifact":
        return ArtifactStored(**fields)
    if kind == "log":
        return LogBatch(lines=[LogLine(t=_dt(t), stream="sdk", text=str(fields["text"]))])
    raise ValueError(f"unknown record kind {kind!r}")


class EventFactory:
    """Numbers and wraps payloads of one run: ``source="trainer"``, ``seq`` gap-free from 1.

    Example:
        >>> f = EventFactory(job_id="j1", project="p", attempt=1)
        >>> ev = f.build(("metrics", 0.0, {"step": 1, "metrics": {"loss": 0.5}}))
        >>> (ev.seq, ev.subject, ev.data.metrics)
        (1, 'kiln.evt.p.j1.metrics', {'loss': 0.5})
    """

    def __init__(self, job_id: str, project: str = "default", attempt: int = 1) -> None:
        self.job_id = job_id
        self.project = project
        self.attempt = attempt
        self.seq = 0

    def wrap(self, t: float, payload: Any) -> Event:
        # seq is taken only once the payload validated, so a rejected record leaves no gap.
        self.seq += 1
        return Event(id=uuid.uuid4().hex, time=_dt(t), job_id=self.job_id, project=self.project,
                     attempt=self.attempt, source="trainer", seq=self.seq, data=payload)

    def build(self, record: Record) -> Event | None:
        """One record -> one event, or ``None`` (said once on stderr) when the record is invalid."""
        kind, t, fields = record
        try:
            return self.wrap(t, build_payload(kind, t, fields))
        except Exception as exc:  # noqa: BLE001 - a bad record must not stop the others
            warn_once(f"invalid:{kind}", f"invalid {kind} event left out: {exc}".replace("\n", " "))
            return None

    def build_many(self, records: Iterable[Record]) -> list[Event]:
        """Events for ``records`` in order; consecutive log lines share one LogBatch (fewer messages)."""
        events: list[Event] = []
        lines: list[LogLine] = []
        first_t = 0.0
        for kind, t, fields in records:
            if kind == "log" and len(lines) < MAX_LOG_LINES:
                if not lines:
                    first_t = t
                lines.append(LogLine(t=_dt(t), stream="sdk", text=str(fields["text"])))
                continue
            if lines:
                events.append(self.wrap(first_t, LogBatch(lines=lines)))
                lines = []
            if kind == "log":  # batch was full: start the next one with this line
                first_t = t
                lines.append(LogLine(t=_dt(t), stream="sdk", text=str(fields["text"])))
                continue
            ev = self.build((kind, t, fields))
            if ev is not None:
                events.append(ev)
        if lines:
            events.append(self.wrap(first_t, LogBatch(lines=lines)))
        return events
