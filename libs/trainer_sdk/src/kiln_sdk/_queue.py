"""The bounded hand-off between the training thread and the publisher thread.

``put`` is the training thread's whole cost of reporting: a length check and a ``deque.append`` (atomic under the
GIL, so no lock on the fast path).  When the queue is full the training thread must not block, so:

* metric updates are coalesced: the newest value per (step, key) is kept in a side table and published later as
  one ``MetricsLogged`` per step whose ``coalesced`` says how many updates were merged into it;
* progress updates keep only the newest (each one supersedes the previous);
* everything else (epochs, artifacts, log lines) is rare and must never be lost, so it is appended anyway: the bound
  is soft for those.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from ._events import Record


class Marker:
    """A flush/stop request travelling in the queue, so it is handled after everything enqueued before it."""

    __slots__ = ("done", "stop", "deadline", "ok")

    def __init__(self, stop: bool = False, deadline: float = 0.0) -> None:
        self.done = threading.Event()
        self.stop = stop
        self.deadline = deadline
        self.ok = False  # set by the publisher: everything before the marker was acknowledged


class RecordQueue:
    """Bounded FIFO of records with metric coalescing when full.

    Args:
        maxsize: Records held before coalescing starts.
        max_steps: Distinct steps kept while coalescing; beyond it the newest entry absorbs new steps (newest
            value per key wins), so memory stays bounded even when every update has a new step.

    Example:
        >>> q = RecordQueue(maxsize=1)
        >>> for v in (1.0, 2.0, 3.0):
        ...     q.put(("metrics", 0.0, {"step": 7, "metrics": {"loss": v}}))
        >>> [(r[2]["metrics"], r[2].get("coalesced", 0)) for r in q.drain(10)]
        [({'loss': 1.0}, 0), ({'loss': 3.0}, 1)]
    """

    def __init__(self, maxsize: int = 10_000, max_steps: int = 10_000) -> None:
        self.maxsize = maxsize
        self.max_steps = max_steps
        self._dq: deque[Record | Marker] = deque()
        self._lock = threading.Lock()
        self._overflow: dict[int, list[Any]] = {}  # step -> [time, merged metrics, updates merged]
        self._progress: Record | None = None
        self.coalesced_total = 0

    def __len__(self) -> int:
        return len(self._dq) + len(self._overflow) + (self._progress is not None)

    def put(self, record: Record | Marker) -> None:
        """Enqueue without ever blocking (see the module docstring for what happens when full)."""
        if len(self._dq) < self.maxsize and not self._overflow:
            self._dq.append(record)
        else:
            self._put_full(record)

    def _put_full(self, record: Record | Marker) -> None:
        if isinstance(record, Marker) or record[0] not in ("metrics", "progress"):
            self._dq.append(record)
            return
        kind, t, fields = record
        with self._lock:
            if kind == "progress":
                self._progress = record
                return
            step = int(fields["step"])
            entry = self._overflow.get(step)
            if entry is None and len(self._overflow) >= self.max_steps:
                # Out of room for another step: the newest entry moves to this step and keeps the newest values.
                last = next(reversed(self._overflow))
                entry = self._overflow.pop(last)
                self._overflow[step] = entry
            if entry is None:
                self._overflow[step] = [t, dict(fields["metrics"]), 0]
            else:
                entry[0] = t
                entry[1].update(fields["metrics"])
                entry[2] += 1
                self.coalesced_total += 1

    def drain(self, max_items: int) -> list[Record | Marker]:
        """Take up to ``max_items`` in order; coalesced metrics come once the FIFO part is empty.

        A marker never overtakes the coalesced updates made before it: they are emitted just ahead of it.
        """
        out: list[Record | Marker] = []
        popleft = self._dq.popleft
        while len(out) < max_items:
            try:
                item = popleft()
            except IndexError:
                break
            if isinstance(item, Marker) and (self._overflow or self._progress is not None):
                out.extend(self._take_overflow())
            out.append(item)
        if len(out) < max_items and (self._overflow or self._progress is not None):
            out.extend(self._take_overflow())
        return out

    def _take_overflow(self) -> list[Record]:
        with self._lock:
            overflow, self._overflow = self._overflow, {}
            progress, self._progress = self._progress, None
        out: list[Record] = [
            ("metrics", t, {"step": step, "metrics": metrics, "coalesced": merged})
            for step, (t, metrics, merged) in overflow.items()
        ]
        if progress is not None:
            out.append(progress)
        return out
