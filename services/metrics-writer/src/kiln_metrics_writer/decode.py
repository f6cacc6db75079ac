"""Decoding of message payloads: a fast path for the hot kind (``metrics``), the full Event model for the rest.

``MetricsLogged`` events are most of the volume.  For them only the envelope fields the writer stores are validated
(about half the cost of ``Event.model_validate_json``), and the raw JSON is kept so that PostgreSQL takes the
metrics from it itself (one staging row per event, no values encoded in Python).  Anything the fast model refuses
goes through the full ``Event`` model, so both paths accept the same events.

Everything accepted here also fits the SQL columns (lengths, integer ranges, no NUL characters, finite values on
the fast path), so one bad event cannot make a whole batch fail in the database over and over.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from kiln_contracts import EpochCompleted, Event, MetricsLogged

INT32 = 2**31 - 1
INT64 = 2**63 - 1
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
            return Points(env.id, env.job_id, env.attempt, env.time, d.step, d.metrics, data)
    try:
        ev = Event.model_validate_json(data)
    except (ValidationError, ValueError) as exc:
        raise Poison(f"invalid event: {str(exc)[:300]}") from None
    problem = unfit(ev)
    if problem:
        raise Poison(problem)
    return ev


def unfit(ev: Event) -> str | None:
    """Why a valid event would still be refused by the SQL schema, or None."""
    if len(ev.job_id) > 64 or "\x00" in ev.job_id:
        return "job_id longer than 64 characters or with a NUL character"
    if ev.attempt > INT32:
        return "attempt out of range"
    d = ev.data
    if isinstance(d, (MetricsLogged, EpochCompleted)):
        if (d.step if isinstance(d, MetricsLogged) else d.epoch) > INT64:
            return "step out of range"
        if any(len(k) > 200 or "\x00" in k for k in d.metrics):
            return "metric name longer than 200 characters or with a NUL character"
    return None
