"""Pure logic: which ClearML operations a job's events produce.  No I/O here.

:func:`apply` folds one event into a job's :class:`JobState` and returns the operations to run against ClearML,
in order.  Metric names map to ClearML's (title, series) the way Ultralytics groups them: ``train/box_loss`` ->
(``train``, ``box_loss``), ``metrics/mAP50(B)`` -> (``metrics``, ``mAP50(B)``), ``lr/pg0`` -> (``lr``, ``pg0``).

Example:
    >>> from kiln_contracts import EpochCompleted, Event
    >>> st = JobState(job_id="j1", project="p")
    >>> ev = Event.new(job_id="j1", project="p", attempt=1, seq=1, source="trainer",
    ...                data=EpochCompleted(epoch=1, epochs=3, metrics={"train/box_loss": 1.5}))
    >>> [type(op).__name__ for op in apply(st, ev)]
    ['SetStatus', 'ConnectParams', 'ReportScalars']
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from kiln_contracts import (
    ArtifactStored, EpochCompleted, Event, JobFinished, JobStatus, JobStatusChanged, LogBatch, MetricsLogged,
    status_wins,
)

ParamValue = str | int | float | bool | None
ClearMLStatus = Literal["started", "completed", "failed", "stopped"]
PARAMS_SECTION = "Kiln"
EPOCH_TIME = ("Epoch Time", "Epoch Time")  # as Ultralytics' ClearML callback reports it
MODEL_NAMES = ("best.pt", "last.pt")  # the final model, in order of preference
_SEEN_MAX = 20_000


def split_metric(name: str) -> tuple[str, str]:
    """ClearML (title, series) of a Kiln metric name: the part before the first '/' is the title.

    Example:
        >>> split_metric("train/box_loss"), split_metric("fitness")
        (('train', 'box_loss'), ('fitness', 'fitness'))
    """
    title, sep, series = name.partition("/")
    return (title, series) if sep and title and series else (name, name)


# --- operations (what the ClearML adapter is asked to do) ------------------------------------------------
@dataclass(frozen=True)
class Scalar:
    title: str
    series: str
    value: float
    iteration: int


@dataclass(frozen=True)
class ConsoleLine:
    text: str
    time: datetime | None = None
    level: Literal["info", "warning", "error"] = "info"


@dataclass(frozen=True)
class ConnectParams:
    """Set hyper-parameters of the task's ``Kiln`` section (merged with what is there)."""

    values: dict[str, ParamValue]


@dataclass(frozen=True)
class ReportScalars:
    points: tuple[Scalar, ...]


@dataclass(frozen=True)
class ReportConsole:
    lines: tuple[ConsoleLine, ...]


@dataclass(frozen=True)
class Upload:
    """Store a job file on the task: as its output model (``as_model``) or as an artifact."""

    name: str
    uri: str
    size: int
    sha256: str
    as_model: bool


@dataclass(frozen=True)
class SetStatus:
    status: ClearMLStatus
    reason: str = ""


Op = ConnectParams | ReportScalars | ReportConsole | Upload | SetStatus


# --- state of one job -------------------------------------------------------------------------------------
@dataclass
class JobState:
    """What the forwarder knows about one job; ``task_id``, ``status``, ``attempt``, ``started`` survive restarts."""

    job_id: str
    project: str
    task_id: str | None = None
    status: JobStatus | None = None
    attempt: int = 0
    started: bool = False
    name: str = ""
    params: dict[str, ParamValue] = field(default_factory=dict)
    artifacts: dict[str, ArtifactStored] = field(default_factory=dict)
    seen: OrderedDict[str, None] = field(default_factory=OrderedDict)

    @property
    def finished(self) -> bool:
        return self.status is not None and self.status.terminal

    def record(self) -> dict[str, object]:
        """The part kept in the job -> task map."""
        return {"task_id": self.task_id, "project": self.project, "status": self.status.value if self.status else None,
                "attempt": self.attempt, "started": self.started}

    @classmethod
    def from_record(cls, job_id: str, project: str, rec: dict[str, object]) -> JobState:
        status = rec.get("status")
        return cls(job_id=job_id, project=str(rec.get("project") or project), task_id=str(rec["task_id"]),
                   status=JobStatus(str(status)) if status else None, attempt=int(rec.get("attempt") or 0),  # type: ignore[call-overload]
                   started=bool(rec.get("started")))

    def _remember(self, event_id: str) -> bool:
        """False when the event was handled already (a redelivery or a republished copy)."""
        if event_id in self.seen:
            return False
        self.seen[event_id] = None
        if len(self.seen) > _SEEN_MAX:
            self.seen.popitem(last=False)
        return True


def task_name(state: JobState) -> str:
    return state.name or state.job_id


def apply(state: JobState, ev: Event) -> list[Op]:
    """Fold ``ev`` into ``state`` and return the ClearML operations it calls for (possibly none)."""
    if not state._remember(ev.id):
        return []
    d = ev.data
    ops: list[Op] = []
    if isinstance(d, JobStatusChanged):
        ops += _status_changed(state, ev, d)
    elif isinstance(d, EpochCompleted):
        if "epochs" not in state.params:
            ops.append(_params(state, {"epochs": d.epochs}))
        points = [Scalar(*split_metric(k), value=v, iteration=d.epoch) for k, v in d.metrics.items()]
        if d.epoch_time is not None:
            points.append(Scalar(*EPOCH_TIME, value=d.epoch_time, iteration=d.epoch))
        ops.append(ReportScalars(tuple(points)))
    elif isinstance(d, MetricsLogged):
        points = [Scalar(*split_metric(k), value=v, iteration=d.step) for k, v in d.metrics.items()]
        ops.append(ReportScalars(tuple(points)))
    elif isinstance(d, LogBatch):
        ops.append(ReportConsole(tuple(
            ConsoleLine(ln.text, ln.t, "warning" if ln.stream == "stderr" else "info") for ln in d.lines)))
    elif isinstance(d, ArtifactStored):
        if ev.attempt >= state.attempt:
            state.artifacts[d.name] = d
    elif isinstance(d, JobFinished):
        ops += _finished(state, ev, d)
    ops = [op for op in ops if not isinstance(op, (ReportScalars, ReportConsole)) or _nonempty(op)]
    if ops and not state.started and not state.finished:
        state.started = True
        ops.insert(0, SetStatus("started", "first event from Kiln"))
    return ops


def _nonempty(op: ReportScalars | ReportConsole) -> bool:
    return bool(op.points if isinstance(op, ReportScalars) else op.lines)


def _params(state: JobState, values: dict[str, ParamValue]) -> ConnectParams:
    state.params.update(values)
    return ConnectParams(dict(values))


def _status_changed(state: JobState, ev: Event, d: JobStatusChanged) -> list[Op]:
    ops: list[Op] = []
    values: dict[str, ParamValue] = {k: v for k, v in {"runner": d.runner, "host": d.host}.items() if v}
    values.update(d.details)
    if d.spec is not None:  # on "starting": the job's name, model, dataset and every train argument
        values.update({"name": d.spec.name, "model": d.spec.model, "dataset": d.spec.dataset,
                       "task": d.spec.task.value, "pool": d.spec.pool})
        values.update({f"train.{k}": (v.value if hasattr(v, "value") else v)
                       for k, v in d.spec.train.model_dump().items() if isinstance(v, (str, int, float, bool))
                       or hasattr(v, "value")})
    if ev.attempt > 1:
        values["attempt"] = ev.attempt
    name = d.spec.name if d.spec is not None and d.spec.name else d.details.get("name")
    if isinstance(name, str) and name and not state.task_id:
        state.name = name
    changed = {k: v for k, v in values.items() if state.params.get(k, object()) != v}
    if changed:
        ops.append(_params(state, changed))
    if not status_wins(state.status, state.attempt, d.status, ev.attempt):
        return ops
    new_attempt = ev.attempt != state.attempt and state.attempt > 0
    state.status, state.attempt = d.status, ev.attempt
    if d.status in (JobStatus.starting, JobStatus.running):
        text = f"[kiln] attempt {ev.attempt} {d.status.value}" + (f": {d.reason}" if d.reason else "")
        ops.append(ReportConsole((ConsoleLine(text, ev.time),)))
        if new_attempt:  # a retry: the task runs again
            state.started = True
            ops.insert(0, SetStatus("started", f"attempt {ev.attempt}"))
    return ops


def _finished(state: JobState, ev: Event, d: JobFinished) -> list[Op]:
    if not status_wins(state.status, state.attempt, d.status, ev.attempt):
        return []
    state.status, state.attempt = d.status, ev.attempt
    ops: list[Op] = list(final_uploads(state.artifacts))
    detail = f"{d.reason} ({d.exit_class.value}, exit code {d.exit_code})" if d.reason else d.exit_class.value
    level = "info" if d.status == JobStatus.completed else "error"
    ops.append(ReportConsole((ConsoleLine(f"[kiln] job {d.status.value}: {detail}", ev.time, level),)))  # type: ignore[arg-type]
    target: ClearMLStatus = {JobStatus.completed: "completed", JobStatus.cancelled: "stopped"}.get(d.status, "failed")  # type: ignore[assignment]
    ops.append(SetStatus(target, d.reason or d.status.value))
    return ops


def final_uploads(artifacts: dict[str, ArtifactStored]) -> list[Upload]:
    """The job's files at its end: the final model (best.pt, else last.pt) as the output model, the rest as artifacts.

    Example:
        >>> a = {n: ArtifactStored(name=n, uri=f"/w/{n}", size=1, sha256="x") for n in ("last.pt", "best.pt")}
        >>> [(u.name, u.as_model) for u in final_uploads(a)]
        [('best.pt', True), ('last.pt', False)]
    """
    model = next((n for n in MODEL_NAMES if n in artifacts), None)
    order = ([model] if model else []) + sorted(n for n in artifacts if n != model)
    return [Upload(n, artifacts[n].uri, artifacts[n].size, artifacts[n].sha256, as_model=n == model) for n in order]


def coalesce(ops: list[Op]) -> list[Op]:
    """Merge neighbouring scalar and console reports so that a batch of events costs few ClearML calls."""
    out: list[Op] = []
    for op in ops:
        prev = out[-1] if out else None
        if isinstance(op, ReportScalars) and isinstance(prev, ReportScalars):
            out[-1] = ReportScalars(prev.points + op.points)
        elif isinstance(op, ReportConsole) and isinstance(prev, ReportConsole):
            out[-1] = ReportConsole(prev.lines + op.lines)
        elif isinstance(op, ConnectParams) and isinstance(prev, ConnectParams):
            out[-1] = ConnectParams({**prev.values, **op.values})
        else:
            out.append(op)
    return out
