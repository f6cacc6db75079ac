"""Decoding of message payloads: a fast path for the hot kind (``metrics``), the full Event model for the rest.

``MetricsLogged`` events are most of the volume.  For them only the envelope fields the writer stores are validated
(about half the cost of ``Event.model_validate_json``), and the raw JSON is kept so that PostgreSQL takes the
metrics from it itself (one staging row per event, no values encoded in Python).  Anything the fast model refuses
goes through the full ``Event`` model, so both paths accept the same events.

Everything accepted here also fits the SQL columns (lengths, integer ranges, times with a UTC form, finite values on
the fast path), so one bad event cannot make a whole batch fail in the database over and over.  Free text that
PostgreSQL cannot hold is repaired rather than refused, the same way on every backend (:func:`repair`): a NUL
character in a log line, a status reason, a runner or host name, the details or an artifact's name becomes U+FFFD,
and a log line whose own time has no UTC form takes its event's time; so one odd line never costs its neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from kiln_contracts import (
    ArtifactStored, EpochCompleted, Event, JobFinished, JobStatusChanged, LogBatch, MetricsLogged, subjects,
)

INT32 = 2**31 - 1
INT64 = 2**63 - 1
REPLACEMENT = "\ufffd"  # what a NUL character in free text is stored as
_Key = Annotated[str, StringConstraints(min_length=1, max_length=200)]


class _Data(BaseModel):
    model_config = ConfigDict(extra="ignore")

    kind: Literal["metrics"]
    step: int = Field(..., ge=0, le=INT64)
    # strict: JSON numbers only, as PostgreSQL stores the raw JSON; a number in a string ("3.25") takes the full
    # model, which stores the parsed float.
    metrics: dict[_Key, Annotated[float, Field(allow_inf_nan=False, strict=True)]]


class _MetricsEnvelope(BaseModel):
    model_config = ConfigDict(extra="ignore")

    v: Literal[1]
    id: str = Field(..., min_length=1, max_length=128)
    time: datetime
    job_id: str = Field(..., min_length=1, max_length=64)
    project: str = Field(..., min_length=1, max_length=128)
    attempt: int = Field(1, ge=1, le=INT32)
    data: _Data


@dataclass(slots=True)
class Points:
    """A ``MetricsLogged`` event decoded by the fast path."""

    id: str
    job_id: str
    attempt: int
    time: datetime
    step: int
    metrics: dict[str, float]
    raw: bytes  # the message payload: PostgreSQL reads data.metrics from it


Decoded = Union[Event, Points]


class Poison(ValueError):
    """The payload is not an event the writer can store; the reason is the message."""


def decode(subject: str, data: bytes) -> Decoded:
    """Decode one message payload or raise :class:`Poison`."""
    if subject.endswith(".metrics") and b"\\u0000" not in data:
        try:
            env = _MetricsEnvelope.model_validate_json(data)
        except ValidationError:
            pass  # maybe valid for the full model (lax types, non-finite values): try it below
        else:
            d = env.data
            own = subjects.EVENT_ADDRESS.format(project=env.project, job_id=env.job_id) % "metrics"
            if has_utc(env.time) and subject == own:  # else the full check below says why not
                return Points(env.id, env.job_id, env.attempt, env.time, d.step, d.metrics, data)
    try:
        ev = Event.model_validate_json(data)
    except (ValidationError, ValueError) as exc:
        raise Poison(f"invalid event: {str(exc)[:300]}") from None
    problem = ev.misaddressed(subject) or unfit(ev)  # another job's event on this job's subject: never stored
    if problem:
        raise Poison(problem)
    # A NUL can only be in the JSON as the escape \u0000 (JSON has no raw control characters): the check is cheap.
    if isinstance(ev.data, LogBatch) or b"\\u0000" in data:
        ev = repair(ev)
    return ev


def has_utc(t: datetime) -> bool:
    """Whether ``t`` has a UTC form a datetime can hold (``0001-01-01T00:00+01:00`` has none): the database stores
    UTC, and converting such a time raises in Python, before the database sees it."""
    if t.tzinfo is None or 1 < t.year < 9999:
        return True
    try:
        t.astimezone(timezone.utc)
    except OverflowError:
        return False
    return True


def _text(s: str) -> str:
    return s.replace("\x00", REPLACEMENT) if "\x00" in s else s


def repair(ev: Event) -> Event:
    """The event with its free text made storable (see the module's docstring); the same event when nothing needs
    repairing."""
    d = ev.data
    new: object = d
    if isinstance(d, LogBatch):
        if any("\x00" in ln.text or not has_utc(ln.t) for ln in d.lines):
            new = d.model_copy(update={"lines": [
                ln if "\x00" not in ln.text and has_utc(ln.t)
                else ln.model_copy(update={"text": _text(ln.text), "t": ln.t if has_utc(ln.t) else ev.time})
                for ln in d.lines]})
    elif isinstance(d, JobStatusChanged):
        new = d.model_copy(update={
            "reason": _text(d.reason), "runner": _text(d.runner), "host": _text(d.host),
            "details": {_text(k): _text(v) if isinstance(v, str) else v for k, v in d.details.items()}})
    elif isinstance(d, JobFinished):
        new = d.model_copy(update={"reason": _text(d.reason)})
    elif isinstance(d, ArtifactStored):
        new = d.model_copy(update={"name": _text(d.name)})
    return ev if new is d else ev.model_copy(update={"data": new})


def unfit(ev: Event) -> str | None:
    """Why a valid event would still be refused by the SQL schema, or None (for what :func:`repair` mends)."""
    if len(ev.job_id) > 64 or "\x00" in ev.job_id:
        return "job_id longer than 64 characters or with a NUL character"
    if "\x00" in ev.id:
        return "event id with a NUL character"
    if not has_utc(ev.time):
        return "time out of range: it has no UTC form"
    if ev.attempt > INT32:
        return "attempt out of range"
    d = ev.data
    if isinstance(d, (MetricsLogged, EpochCompleted)):
        if (d.step if isinstance(d, MetricsLogged) else d.epoch) > INT64:
            return "step out of range"
        if any(len(k) > 200 or "\x00" in k for k in d.metrics):
            return "metric name longer than 200 characters or with a NUL character"
    return None
