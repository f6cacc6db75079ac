"""Events: past-tense facts about a job, all wrapped in one :class:`Event` envelope.

Every event is published on ``kiln.evt.<project>.<job_id>.<kind>`` (logs on ``kiln.log.<project>.<job_id>``)
with ``Nats-Msg-Id`` set to the envelope ``id``, so a retried publish is stored once and every consumer can
de-duplicate on it.

Example:
    >>> ev = Event.new(job_id="j1", project="default", attempt=1, seq=1, source="runner",
    ...                data=JobStatusChanged(status=JobStatus.running))
    >>> Event.model_validate_json(ev.model_dump_json()).data.status.value
    'running'
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import Enum
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from . import subjects
from .commands import SCHEMA_VERSION, ExitClass, JobSpec, utcnow


class JobStatus(str, Enum):
    created = "created"
    queued = "queued"
    starting = "starting"
    running = "running"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"
    lost = "lost"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.completed, JobStatus.failed, JobStatus.cancelled, JobStatus.lost})
_RANK = {s: i for i, s in enumerate(JobStatus)}


def status_wins(current: JobStatus | None, current_attempt: int, new: JobStatus, new_attempt: int) -> bool:
    """Whether a status event (``new``, ``new_attempt``) replaces the projected status.

    Terminal states never change; events of an older attempt are ignored; within an attempt the
    lifecycle only moves forward (a late ``running`` never overwrites ``completed``).
    """
    if current is None:
        return True
    if current.terminal:
        return False
    if new_attempt != current_attempt:
        return new_attempt > current_attempt
    return _RANK[new] > _RANK[current]


SeqCheck = Literal["next", "gap", "old", "unknown"]


def seq_check(last_seq: int, seq: int, prev: int | None) -> SeqCheck:
    """What an event means to a consumer of one stream (KILN_EVENTS or KILN_LOGS alone) that holds its publisher's
    events there up to ``last_seq`` (0: none yet); ``seq`` and ``prev`` are the event's (see :attr:`Event.seq_key`).

    ``"next"``: nothing is missing before it. ``"gap"``: at least one event of that publisher on this stream is
    missing before it, the last of them numbered ``prev`` (not stored yet or ever, e.g. refused as too large).
    ``"old"``: numbered at or before ``last_seq``: a redelivery (an ``id`` already held) or, after a fault, an event
    stored behind later ones (it fills a gap seen earlier). ``"unknown"``: published without ``prev`` (before Kiln
    had it); nothing to check.

    Example:
        >>> seq_check(0, 1, 0), seq_check(3, 7, 3), seq_check(3, 7, 5), seq_check(7, 7, 3), seq_check(3, 4, None)
        ('next', 'next', 'gap', 'old', 'unknown')
    """
    if seq <= last_seq:
        return "old"
    if prev is None:
        return "unknown"
    return "next" if prev == last_seq else "gap"


class _Payload(BaseModel):
    model_config = ConfigDict(extra="ignore")


class JobStatusChanged(_Payload):
    """The job moved to a new lifecycle status (queued, starting, running)."""

    kind: Literal["status"] = "status"
    status: JobStatus = Field(..., description="New status.")
    reason: str = Field("", description="Why, in words (e.g. which runner claimed it).")
    runner: str = Field("", description="Runner id that holds the job, when one does.")
    host: str = Field("", description="Host name of that runner.")
    details: dict[str, str | int | float | bool | None] = Field(
        default_factory=dict,
        description="Reproducibility record on 'running': pid, dataset path and snapshot hash, seed, slot, "
                    "CUDA_VISIBLE_DEVICES, host, versions of kiln/ultralytics/torch/CUDA.",
    )
    spec: JobSpec | None = Field(None, description="The job's spec, on 'starting' (hyper-parameters for trackers).")


class EpochCompleted(_Payload):
    """One training epoch finished; carries every metric Ultralytics reported for it."""

    kind: Literal["epoch"] = "epoch"
    epoch: int = Field(..., ge=1, description="Epoch number, 1-based.")
    epochs: int = Field(..., ge=1, description="Planned number of epochs.")
    metrics: dict[str, float] = Field(
        ..., description="Train losses (train/*), validation metrics (metrics/*, val/*), learning rates (lr/pg*), fitness."
    )
    epoch_time: float | None = Field(None, description="Seconds spent on this epoch.")


class MetricsLogged(_Payload):
    """Free-form metrics logged by the SDK's ``log_metrics(step, metrics)``."""

    kind: Literal["metrics"] = "metrics"
    step: int = Field(..., ge=0, description="Step the metrics belong to.")
    metrics: dict[str, float] = Field(..., description="Metric name to value.")
    coalesced: int = Field(0, ge=0, description="Updates merged into this one because the SDK queue was full.")


class Progress(_Payload):
    """Throttled in-epoch progress, for a live progress bar."""

    kind: Literal["progress"] = "progress"
    epoch: int = Field(..., ge=1, description="Current epoch, 1-based.")
    epochs: int = Field(..., ge=1, description="Planned epochs.")
    batch: int = Field(..., ge=0, description="Batches done in this epoch.")
    batches: int = Field(..., ge=0, description="Batches per epoch.")
    images_per_s: float | None = Field(None, description="Training throughput.")
    eta_s: float | None = Field(None, description="Estimated seconds until the end of training.")


class ArtifactStored(_Payload):
    """A file produced by the job (checkpoint, export) and where it is stored."""

    kind: Literal["artifact"] = "artifact"
    name: str = Field(..., description="Artifact name, e.g. 'last.pt'.")
    uri: str = Field(..., description="Where it is stored (file path or s3:// URI).")
    size: int = Field(..., ge=0, description="Size in bytes.")
    sha256: str = Field(..., description="SHA-256 of the content.")
    epoch: int | None = Field(None, description="Epoch it belongs to.")


class Heartbeat(_Payload):
    """The runner holding the job is alive and the trainer process still runs."""

    kind: Literal["heartbeat"] = "heartbeat"
    runner: str = Field(..., description="Runner id.")
    pid: int | None = Field(None, description="Trainer process id.")


class JobFinished(_Payload):
    """The attempt ended: completed, failed, cancelled or lost, with the cause."""

    kind: Literal["finished"] = "finished"
    status: JobStatus = Field(..., description="Terminal status.")
    reason: str = Field("", description="Cause in words; empty when completed.")
    exit_code: int | None = Field(None, description="Trainer exit code (negative: killed by that signal).")
    exit_class: ExitClass = Field(ExitClass.ok, description="Classified cause.")
    last_logs: list[str] = Field(default_factory=list, description="Last log lines of the trainer.")


class LogLine(BaseModel):
    model_config = ConfigDict(extra="ignore")

    t: datetime = Field(default_factory=utcnow, description="When the line was read.")
    stream: Literal["stdout", "stderr", "sdk", "runner"] = Field("stdout", description="Where the line came from.")
    text: str = Field(..., description="The line, without the newline.")


class LogBatch(_Payload):
    """Consecutive log lines of the job (published on ``kiln.log.<project>.<job_id>``)."""

    kind: Literal["log"] = "log"
    lines: list[LogLine] = Field(..., description="Lines in order.")


EventData = Annotated[
    Union[JobStatusChanged, EpochCompleted, MetricsLogged, Progress, ArtifactStored, Heartbeat, JobFinished, LogBatch],
    Field(discriminator="kind"),
]
PAYLOADS: tuple[type[_Payload], ...] = (
    JobStatusChanged, EpochCompleted, MetricsLogged, Progress, ArtifactStored, Heartbeat, JobFinished, LogBatch,
)


class Event(BaseModel):
    """The envelope of every Kiln event."""

    model_config = ConfigDict(extra="ignore")

    v: Literal[1] = Field(SCHEMA_VERSION, description="Schema version of the envelope and payload.")
    id: str = Field(..., min_length=1, max_length=128, description="Unique event id; also the JetStream Nats-Msg-Id.")
    time: datetime = Field(..., description="When the event happened (UTC).")
    job_id: str = Field(..., description="Job the event belongs to.")
    project: str = Field("default", description="Project of the job.")
    attempt: int = Field(1, ge=1, description="Attempt of the job that produced the event.")
    source: Literal["api", "runner", "trainer", "reaper"] = Field(..., description="Which component published it.")
    seq: int = Field(
        ..., ge=1,
        description="Number of the event among those its publisher ('publisher') put on either stream for this job "
                    "attempt, KILN_EVENTS and KILN_LOGS together: 1, 2, 3... with none skipped, so a number a "
                    "consumer of both streams lacks is an event it has not got. One stream alone skips the other's "
                    "numbers: its consumer checks 'prev'.",
    )
    prev: int | None = Field(
        None, ge=0,
        description="The 'seq' of the event its publisher put on the same stream (KILN_EVENTS or KILN_LOGS) just "
                    "before this one; 0 when this is its first there. A consumer of that stream alone lacks one of "
                    "the publisher's events exactly when 'prev' is not the 'seq' of the last one it holds (0 when "
                    "it holds none). Null from publishers older than this field.",
    )
    publisher: str | None = Field(
        None, max_length=128,
        description="Who numbered the event: one run of the SDK (one trainer process), the runner holding the "
                    "attempt, or, for an event published on its own (queued, cancelled while queued, lost, invalid "
                    "start), the event itself (its id). 'seq' and 'prev' count per job, attempt and publisher. Null "
                    "from publishers older than this field: they counted per job, attempt and source.",
    )
    data: EventData = Field(..., description="The payload; its 'kind' names the subject's last token.")

    @classmethod
    def new(cls, *, job_id: str, project: str, attempt: int, seq: int, source: str, data: _Payload,
            prev: int | None = None, publisher: str | None = None) -> "Event":
        return cls(
            id=uuid.uuid4().hex, time=utcnow(), job_id=job_id, project=project, attempt=attempt,
            seq=seq, prev=prev, publisher=publisher, source=source, data=data,  # type: ignore[arg-type]
        )

    @classmethod
    def single(cls, *, id: str, job_id: str, project: str, attempt: int, source: str, data: _Payload,
               time: datetime | None = None) -> "Event":
        """An event published on its own, under a fixed id (so that publishing it twice stores it once): it is its
        own publisher, numbered 1 with nothing before it.

        Example:
            >>> ev = Event.single(id="j1-2-queued", job_id="j1", project="p", attempt=2, source="reaper",
            ...                   data=JobStatusChanged(status=JobStatus.queued))
            >>> ev.publisher, ev.seq, ev.prev, ev.seq_key
            ('j1-2-queued', 1, 0, ('j1', 2, 'j1-2-queued'))
        """
        return cls(id=id, time=time or utcnow(), job_id=job_id, project=project, attempt=attempt,
                   source=source, seq=1, prev=0, publisher=id, data=data)  # type: ignore[arg-type]

    @property
    def stream(self) -> str:
        """``"logs"`` for a log batch (KILN_LOGS), else ``"events"`` (KILN_EVENTS)."""
        return "logs" if self.data.kind == "log" else "events"

    @property
    def seq_key(self) -> tuple[str, int, str]:
        """What ``seq`` and ``prev`` count per: job, attempt and publisher (the source for older publishers)."""
        return self.job_id, self.attempt, self.publisher or self.source

    @property
    def subject(self) -> str:
        if self.data.kind == "log":
            return subjects.log(self.project, self.job_id)
        return subjects.event(self.project, self.job_id, self.data.kind)

    def misaddressed(self, subject: str) -> str | None:
        """Why this event must not be believed when it came on ``subject`` (None: it belongs there).

        NATS checks who may publish on a subject, never what the payload says: a trainer's identity may publish
        only on its own job's subjects, so an event is that job's only if the subject it came on is the one its
        envelope names.  Every consumer checks this before it stores or relays anything.

        Example:
            >>> ev = Event.new(job_id="j1", project="p1", attempt=1, seq=1, source="trainer",
            ...                data=JobFinished(status=JobStatus.completed))
            >>> ev.misaddressed("kiln.evt.p1.j1.finished") is None
            True
            >>> ev.misaddressed("kiln.evt.p1.j2.finished").endswith("names kiln.evt.p1.j1.finished but came on "
            ...                                                 "kiln.evt.p1.j2.finished")
            True
        """
        try:
            expected = self.subject
        except ValueError as exc:  # an id that cannot be a subject token: it came on no subject of its own
            return f"event {self.id} names no valid subject: {exc}"
        if subject == expected:
            return None
        return f"event {self.id} names {expected} but came on {subject}"

    def headers(self) -> dict[str, str]:
        return {"Nats-Msg-Id": self.id}

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()
