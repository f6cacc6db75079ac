"""Turning SDK records into :class:`kiln_contracts.Event` envelopes (off the training thread where it matters).

A *record* is what the training thread enqueues: ``(kind, unix_time, fields)``.  It is cheap to build (no
validation, no serialization); :class:`EventFactory` validates it into a payload and wraps it in the envelope with
the next ``seq`` (gap-free across both streams) and ``prev`` (the ``seq`` of the run's last event on the same stream),
under the run's own ``publisher`` id: see ``Event.seq_key`` in :mod:`kiln_contracts.events`.

The publisher does not need :class:`kiln_contracts.Event` objects, only their JSON:
:meth:`EventFactory.serialize_many` writes ``MetricsLogged`` events (the high-volume kind) straight to JSON with
``pydantic_core.to_json`` (a few us instead of about 50 us through the models); every other kind goes through the
contract models.  The unit tests check that both paths write the same bytes.
"""

from __future__ import annotations

import math
import secrets
import signal
import sys
import threading
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from pydantic_core import to_json

from kiln_contracts import (
    ArtifactStored,
    EpochCompleted,
    Event,
    LogBatch,
    LogLine,
    MetricsLogged,
    Progress,
    subjects,
)

Record = tuple[str, float, dict[str, Any]]
"""``(kind, time.time(), payload fields)`` as enqueued by :class:`kiln_sdk.Run`."""

Message = tuple[str, bytes, str]
"""``(subject, payload, msg_id)``: one serialized event, ready to publish or spool."""

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


_PROCESS_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def start_thread(thread: threading.Thread) -> None:
    """Start an SDK background thread that never takes SIGTERM/SIGINT/SIGHUP.

    The kernel hands a process-directed signal to any thread that does not block it.  When that is one of ours, the
    C-level handler only flags it for the main thread, and a main thread blocked in ``time.sleep`` or a queue wait does
    not wake up to run the Python handler: the SDK's flush-on-SIGTERM (and the script's own handler) would wait until
    the main thread next runs bytecode.  The mask is set around ``start()`` so the new thread has it from its first
    instruction (set inside the thread, a signal could land before the thread first ran).
    """
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _PROCESS_SIGNALS)
    except (AttributeError, OSError, ValueError):  # not POSIX
        thread.start()
        return
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def clean_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Floats only: tensors/numpy scalars are converted; NaN/inf are left out.

    JSON has no NaN: pydantic would write ``null`` and every consumer would then reject the whole event, so a
    non-finite value is dropped (and said once on stderr) rather than poisoning the stream.
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            f = float(value)
        except (TypeError, ValueError, OverflowError):
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
    """Numbers and wraps payloads of one run: ``source="trainer"``, its own ``publisher`` id, ``seq`` gap-free from 1
    across both streams, ``prev`` linking each stream's events (0 before the first).

    Example:
        >>> f = EventFactory(job_id="j1", project="p", attempt=1)
        >>> ev = f.build(("metrics", 0.0, {"step": 1, "metrics": {"loss": 0.5}}))
        >>> (ev.seq, ev.prev, ev.subject, ev.data.metrics)
        (1, 0, 'kiln.evt.p.j1.metrics', {'loss': 0.5})
        >>> [(e.seq, e.prev, e.stream) for e in f.build_many([("log", 0.0, {"text": "hi"}), ("progress", 0.0,
        ...     {"epoch": 1, "epochs": 2, "batch": 1, "batches": 9})])]
        [(2, 0, 'logs'), (3, 1, 'events')]
    """

    def __init__(self, job_id: str, project: str = "default", attempt: int = 1) -> None:
        self.job_id = job_id
        self.project = project
        self.attempt = attempt
        self.seq = 0
        self.last_event = self.last_log = 0  # seq of the last event put on KILN_EVENTS, on KILN_LOGS (``prev``)
        # One publisher per run (per process): a DDP worker's run and its launcher's count apart.
        self.publisher = secrets.token_hex(4)
        # Event ids: 80 random bits per factory + the seq (unique like a uuid4, without its cost per event).
        self._id_prefix = secrets.token_hex(10)
        self._metrics_subject = subjects.event(project, job_id, "metrics")

    def _next(self, log: bool) -> tuple[int, int, str]:
        # seq is taken only once the payload validated, so a rejected record leaves no gap.
        self.seq += 1
        if log:
            prev, self.last_log = self.last_log, self.seq
        else:
            prev, self.last_event = self.last_event, self.seq
        return self.seq, prev, f"{self._id_prefix}{self.seq:012x}"

    def wrap(self, t: float, payload: Any) -> Event:
        seq, prev, eid = self._next(payload.kind == "log")
        return Event(id=eid, time=_dt(t), job_id=self.job_id, project=self.project, attempt=self.attempt,
                     source="trainer", seq=seq, prev=prev, publisher=self.publisher, data=payload)

    def _metrics_json(self, t: float, fields: dict[str, Any]) -> Message | None:
        """A ``MetricsLogged`` event as JSON without the models, or ``None`` when the record needs the slow path.

        ``pydantic_core.to_json`` writes a plain dict the way the models would (same key order, same float and
        datetime formats) in about 4 us; the checks before it send anything unusual to the models.
        """
        step = fields["step"]
        metrics = fields["metrics"]
        coalesced = fields.get("coalesced", 0)
        if type(step) is not int or step < 0 or type(coalesced) is not int or coalesced < 0:
            return None
        ints = False
        for key, value in metrics.items():
            if type(value) is not float:
                if type(value) is not int:
                    return None  # tensors, numpy scalars, bools: the slow path converts them
                ints = True
            if type(key) is not str:
                return None
        if ints:  # written as floats, as the model would (3 -> 3.0)
            try:
                metrics = {k: float(v) for k, v in metrics.items()}
            except OverflowError:
                return None
        seq = self.seq + 1
        eid = f"{self._id_prefix}{seq:012x}"
        payload = to_json({
            "v": 1, "id": eid, "time": datetime.fromtimestamp(t, timezone.utc), "job_id": self.job_id,
            "project": self.project, "attempt": self.attempt, "source": "trainer", "seq": seq,
            "prev": self.last_event, "publisher": self.publisher,
            "data": {"kind": "metrics", "step": step, "metrics": metrics, "coalesced": coalesced},
        })
        if b"NaN" in payload or b"Infinity" in payload:  # non-finite values: the slow path leaves them out
            return None
        self.seq = self.last_event = seq
        return self._metrics_subject, payload, eid

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

    def serialize_many(self, records: Iterable[Record]) -> list[Message]:
        """Like :meth:`build_many`, but straight to ``(subject, JSON, id)``: the publisher's fast path."""
        out: list[Message] = []
        logs: list[Record] = []  # consecutive log lines, batched by build_many

        def slow(recs: list[Record]) -> None:
            out.extend((e.subject, e.model_dump_json().encode(), e.id) for e in self.build_many(recs))

        for record in records:
            if record[0] == "log":
                logs.append(record)
                continue
            if logs:
                slow(logs)
                logs = []
            msg = self._metrics_json(record[1], record[2]) if record[0] == "metrics" else None
            if msg is not None:
                out.append(msg)
            else:
                slow([record])
        if logs:
            slow(logs)
        return out
