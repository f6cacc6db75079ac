"""Pure logic: turn a batch of events into rows and status-projection changes."""

from __future__ import annotations

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

    metrics: list[dict[str, Any]] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)
    status_events: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    touched_jobs: set[str] = field(default_factory=set)

    @property
    def count(self) -> int:
        return len(self.metrics) + len(self.logs) + len(self.status_events) + len(self.artifacts)


def to_rows(events: list[Decoded]) -> Rows:
    rows = Rows()
    for ev in events:
        if isinstance(ev, Points):
            base = {"event_id": ev.id, "job_id": ev.job_id, "attempt": ev.attempt, "time": ev.time}
            rows.metrics += [{**base, "key": k, "kind": "metrics", "step": ev.step, "value": v}
                             for k, v in ev.metrics.items()]
            continue
        d = ev.data
        base = {"event_id": ev.id, "job_id": ev.job_id, "attempt": ev.attempt, "time": ev.time}
        if isinstance(d, EpochCompleted):
            vals = dict(d.metrics)
            if d.epoch_time is not None:
                vals.setdefault("time/epoch", d.epoch_time)
            rows.metrics += [{**base, "key": k, "kind": "epoch", "step": d.epoch, "value": v} for k, v in vals.items()]
            rows.touched_jobs.add(ev.job_id)
        elif isinstance(d, MetricsLogged):
            rows.metrics += [{**base, "key": k, "kind": "metrics", "step": d.step, "value": v} for k, v in d.metrics.items()]
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
