"""Kiln contracts: the single source of subjects, stream/consumer configuration and event schemas."""

from . import streams, subjects
from .audit import AuditAction, AuditRecorded
from .commands import SCHEMA_VERSION, CancelJob, JobSpec, Optimizer, StartJob, Task, TrainArgs, utcnow
from .events import (
    PAYLOADS,
    TERMINAL,
    ArtifactStored,
    EpochCompleted,
    Event,
    EventData,
    ExitClass,
    Heartbeat,
    JobFinished,
    JobStatus,
    JobStatusChanged,
    LogBatch,
    LogLine,
    MetricsLogged,
    Progress,
    seq_check,
    status_wins,
)

__all__ = [
    "SCHEMA_VERSION", "CancelJob", "JobSpec", "Optimizer", "StartJob", "Task", "TrainArgs", "utcnow",
    "PAYLOADS", "TERMINAL", "ArtifactStored", "EpochCompleted", "Event", "EventData", "ExitClass", "Heartbeat",
    "JobFinished",
    "JobStatus", "JobStatusChanged", "LogBatch", "LogLine", "MetricsLogged", "Progress", "seq_check", "status_wins",
    "streams", "subjects", "AuditAction", "AuditRecorded",
]
