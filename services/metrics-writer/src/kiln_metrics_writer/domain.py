"""Pure logic: turn a batch of events into rows and status-projection changes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kiln_contracts import (
    ArtifactStored, EpochCompleted, Event, Heartbeat, JobFinished, JobStatus, JobStatusChanged, LogBatch,
    MetricsLogged, status_wins,
)

from .decode import Decoded, Points


@dataclass
class Rows:
    """Rows to insert (idempotent on their primary keys) and the job-status projection to upsert."""

    metric_events: list[dict[str, Any]] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)
    status_events: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    touched_jobs: set[str] = field(default_factory=set)

    @property
    def count(self) -> int:
        return len(self.metric_events) + len(self.logs) + len(self.status_events) + len(self.artifacts)


_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def json_values(values: dict[str, float]) -> dict[str, float | str]:
    """Metric values as JSON can hold them: NaN and the infinities as the strings "NaN", "Infinity", "-Infinity"
    (what PostgreSQL makes of a float8 NaN in JSON, and what it casts back to float8; the readers do the same)."""
    if all(math.isfinite(v) for v in values.values()):
        return values
    return {k: v if math.isfinite(v) else _NON_FINITE[repr(v)] for k, v in values.items()}


def to_rows(events: list[Decoded]) -> Rows:
    rows = Rows()
    for ev in events:
        if isinstance(ev, Points):
            rows.metric_events.append({"event_id": ev.id, "job_id": ev.job_id, "attempt": ev.attempt,
                                       "kind": "metrics", "step": ev.step, "time": ev.time, "values": ev.metrics})
            continue
        d = ev.data
        base = {"event_id": ev.id, "job_id": ev.job_id, "attempt": ev.attempt, "time": ev.time}
        if isinstance(d, EpochCompleted):
            vals = dict(d.metrics)
            if d.epoch_time is not None:
                vals.setdefault("time/epoch", d.epoch_time)
            rows.metric_events.append({**base, "kind": "epoch", "step": d.epoch, "values": json_values(vals)})
            rows.touched_jobs.add(ev.job_id)
        elif isinstance(d, MetricsLogged):
            rows.metric_events.append({**base, "kind": "metrics", "step": d.step, "values": json_values(d.metrics)})
        elif isinstance(d, LogBatch):
            rows.logs += [
                {**base, "line_no": i, "stream": ln.stream, "text": ln.text, "time": ln.t} for i, ln in enumerate(d.lines)
            ]
        elif isinstance(d, (JobStatusChanged, JobFinished)):
            rows.status_events.append({**base, "status": d.status.value, "reason": d.reason})
            rows.touched_jobs.add(ev.job_id)
        elif isinstance(d, ArtifactStored):
            rows.artifacts.append(
                {**base, "name": d.name, "uri": d.uri, "size": d.size, "sha256": d.sha256, "epoch": d.epoch}
            )
        elif isinstance(d, Heartbeat):
            rows.touched_jobs.add(ev.job_id)
    return rows


def project_status(current: dict[str, Any] | None, events: list[Event], now: datetime) -> dict[str, Any] | None:
    """Apply a job's events (in stream order) to its status row; returns the new row or None when unchanged."""
    row = dict(current) if current else None
    changed = False
    for ev in events:
        d = ev.data
        cur_status = JobStatus(row["status"]) if row else None
        cur_attempt = row["attempt"] if row else 0
        if isinstance(d, (JobStatusChanged, JobFinished)):
            if not status_wins(cur_status, cur_attempt, d.status, ev.attempt):
                continue
            if row is None or ev.attempt != cur_attempt:
                row = {"job_id": ev.job_id, "reason": "", "exit_code": None, "exit_class": None, "runner": "",
                       "host": "", "epoch": None, "epochs": None, "details": {}, "started_at": None,
                       "finished_at": None, "last_heartbeat_at": None}
            row.update(status=d.status.value, attempt=ev.attempt, reason=d.reason)
            if isinstance(d, JobStatusChanged):
                row["runner"] = d.runner or row.get("runner", "")
                row["host"] = d.host or row.get("host", "")
                row["details"] = {**(row.get("details") or {}), **d.details}
                if d.status == JobStatus.running and not row.get("started_at"):
                    row["started_at"] = ev.time
            else:
                row.update(exit_code=d.exit_code, exit_class=d.exit_class.value, finished_at=ev.time)
            changed = True
        elif row is not None and ev.attempt == row["attempt"] and not JobStatus(row["status"]).terminal:
            if isinstance(d, EpochCompleted) and (row.get("epoch") or 0) < d.epoch:
                row.update(epoch=d.epoch, epochs=d.epochs)
                changed = True
            elif isinstance(d, Heartbeat):
                row["last_heartbeat_at"] = ev.time
                changed = True
        elif row is None and isinstance(d, (EpochCompleted, Heartbeat)):
            continue
    if not changed or row is None:
        return None
    row["updated_at"] = now
    return row


def count_points(items: list[Decoded]) -> int:
    """Metric values in a batch (what ``kiln_writer_points_written_total`` counts): one per metric of each
    ``MetricsLogged`` and ``EpochCompleted``.

    Example:
        >>> from datetime import timezone
        >>> p = Points("e1", "j1", 1, datetime.now(timezone.utc), 3, {"loss": 0.5, "lr": 0.01}, b"{}")
        >>> count_points([p, p])
        4
    """
    n = 0
    for item in items:
        if isinstance(item, Points):
            n += len(item.metrics)
        elif isinstance(item.data, (MetricsLogged, EpochCompleted)):
            n += len(item.data.metrics)
    return n
