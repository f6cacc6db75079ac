"""Reporters: where a run's events go.  All share one interface; the run never knows which one it has.

* :class:`NullReporter` - outside Kiln: nothing is recorded.
* :class:`FileReporter` - outside Kiln with ``KILN_SDK_FILE``: events as JSON lines in a local file.
* :class:`RecordingReporter` - tests: keeps the :class:`kiln_contracts.Event` objects in a list.
* :class:`kiln_sdk.NatsReporter` - inside Kiln: JetStream, from a background thread, with a spool.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from kiln_contracts import Event

from ._events import EventFactory, Record


class Reporter:
    """Interface of every reporter.  ``submit`` is called on the training thread and must be cheap.

    Subclasses override what they need; the base class is a working no-op.
    """

    def submit(self, record: Record) -> None:
        """Take one record ``(kind, time.time(), fields)``; never blocks for long, never raises."""

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait up to ``timeout`` s until everything submitted is delivered; True when it is."""
        return True

    def close(self, timeout: float = 10.0) -> bool:
        """Flush (bounded by ``timeout``) and release resources; later submits are ignored."""
        return self.flush(timeout)

    @property
    def stats(self) -> dict[str, Any]:
        """Counters for diagnostics (delivered, spooled, coalesced...)."""
        return {}


class NullReporter(Reporter):
    """Drops everything: the SDK is a no-op outside Kiln unless asked to log locally.

    Example:
        >>> NullReporter().submit(("metrics", 0.0, {"step": 1, "metrics": {"loss": 1.0}}))
    """


class RecordingReporter(Reporter):
    """Builds the events synchronously and keeps them in :attr:`events` (for tests).

    Example:
        >>> rec = RecordingReporter(job_id="j1")
        >>> rec.submit(("metrics", 0.0, {"step": 3, "metrics": {"loss": 0.25}}))
        >>> [(e.seq, e.data.kind, e.data.step) for e in rec.events]
        [(1, 'metrics', 3)]
    """

    def __init__(self, job_id: str = "local", project: str = "default", attempt: int = 1) -> None:
        self.factory = EventFactory(job_id, project, attempt)
        self.events: list[Event] = []
        self.closed = False
        self._lock = threading.Lock()

    def submit(self, record: Record) -> None:
        with self._lock:
            self.events.extend(self.factory.build_many([record]))

    def close(self, timeout: float = 10.0) -> bool:
        self.closed = True
        return True

    def of_kind(self, kind: str) -> list[Any]:
        """Payloads of one kind (``"metrics"``, ``"epoch"``, ``"progress"``, ``"artifact"``, ``"log"``)."""
        return [e.data for e in self.events if e.data.kind == kind]


class FileReporter(Reporter):
    """Appends each event as one JSON line to ``path`` (a local logger for runs outside Kiln).

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "events.jsonl"
        >>> rep = FileReporter(path)
        >>> rep.submit(("log", 0.0, {"text": "hello"}))
        >>> rep.close()
        True
        >>> Event.model_validate_json(path.read_text().splitlines()[0]).data.lines[0].text
        'hello'
    """

    def __init__(self, path: str | Path, job_id: str = "local", project: str = "default", attempt: int = 1) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.factory = EventFactory(job_id, project, attempt)
        self._lock = threading.Lock()
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the run's lifetime

    def submit(self, record: Record) -> None:
        with self._lock:
            if self._fh.closed:
                return
            for ev in self.factory.build_many([record]):
                self._fh.write(ev.model_dump_json() + "\n")

    def flush(self, timeout: float = 10.0) -> bool:
        with self._lock:
            if not self._fh.closed:
                self._fh.flush()
        return True

    def close(self, timeout: float = 10.0) -> bool:
        with self._lock:
            self._fh.close()
        return True
