"""Pure notifier logic: WebSocket messages, client operations, origin policy, de-duplication, queue policy.

Nothing here touches NATS or a socket, so all of it is unit-testable in memory.

Example:
    >>> gate = SeqGate(after=2)
    >>> [gate.accept(s) for s in (1, 2, 3, 3, 4)]
    [False, False, True, False, True]
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from kiln_contracts import Event, subjects
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

EVENTS = "events"
LOGS = "logs"
HEARTBEAT_KIND = "heartbeat"
MAX_SEQ = 2**63 - 1
"""Largest cursor a client may send (JetStream sequences are 64-bit)."""


def job_key(job_id: str) -> str:
    """Subscription key of one job; ids cannot contain ':' so keys never collide."""
    return f"job:{job_id}"


def project_key(project: str) -> str:
    """Subscription key of all the jobs of one project."""
    return f"project:{project}"


# -- messages sent to clients -------------------------------------------------------------------------------------


def event_message(sub: str, stream: str, seq: int, data: bytes, *, heartbeats: bool = False,
                  subject: str | None = None) -> str | None:
    """Build the WebSocket text for one JetStream message, or ``None`` when it is filtered out.

    Raises:
        ValueError: the payload is not a valid Kiln event of a known schema version (pydantic's
            ``ValidationError`` is a ``ValueError``), or it names another job than the ``subject`` it came on
            (``Event.misaddressed``: only a job's own identity publishes there); the caller skips and logs it.

    Example:
        >>> from kiln_contracts import Heartbeat
        >>> ev = Event.new(job_id="j1", project="p", attempt=1, seq=1, source="runner", data=Heartbeat(runner="r"))
        >>> event_message("job:j1", "events", 7, ev.to_bytes()) is None
        True
    """
    event = Event.model_validate_json(data)
    wrong = event.misaddressed(subject) if subject is not None else None
    if wrong:
        raise ValueError(wrong)
    if event.data.kind == HEARTBEAT_KIND and not heartbeats:
        return None
    head = json.dumps({"type": "event", "sub": sub, "stream": stream, "seq": seq, "job_id": event.job_id})
    # Splice the envelope in rather than dump a dict: one serialisation per message, exactly the contract's JSON.
    return f'{head[:-1]}, "event": {event.model_dump_json()}}}'


def error_message(reason: str, **extra: object) -> str:
    """An ``error`` answer; the connection stays open."""
    return json.dumps({"type": "error", "reason": reason, **extra})


def subscribed_message(sub: str, cursor: dict[str, int | None]) -> str:
    """Sent before the first event of a subscription: the key to match events and the cursor it starts from."""
    return json.dumps({"type": "subscribed", "sub": sub, **{f"after_{k}": v for k, v in cursor.items()}})


def unsubscribed_message(sub: str) -> str:
    """Sent after the last event of a subscription."""
    return json.dumps({"type": "unsubscribed", "sub": sub})


def overflow_message(cursor: dict[str, dict[str, int | None]]) -> str:
    """Sent before a 1013 close: per subscription, the query parameters that resume it without a gap."""
    resume = {sub: {f"after_{stream}": seq for stream, seq in streams.items()} for sub, streams in cursor.items()}
    return json.dumps({"type": "overflow", "dropped_after": resume})


# -- client operations on the multi-job socket --------------------------------------------------------------------


class _Target(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str | None = Field(None, description="One job: its events and log batches.")
    project: str | None = Field(None, description="Every job of a project: events only (no log batches).")

    @model_validator(mode="after")
    def _one_target(self) -> _Target:
        if (self.job_id is None) == (self.project is None):
            raise ValueError("give exactly one of job_id or project")
        subjects.token(self.job_id or self.project or "")  # ids become subject tokens
        return self

    @property
    def key(self) -> str:
        return job_key(self.job_id) if self.job_id else project_key(self.project or "")


class Subscribe(_Target):
    """``{"op": "subscribe", "job_id": "...", "after_events": N, "after_logs": M}`` or ``{"project": "..."}``."""

    op: Literal["subscribe"]
    after_events: int | None = Field(None, ge=0, le=MAX_SEQ, description="Last events-stream sequence the client has.")
    after_logs: int | None = Field(
        None, ge=0, le=MAX_SEQ, description="Last logs-stream sequence the client has (jobs only).")
    heartbeats: bool = Field(False, description="Also relay heartbeat events.")

    @model_validator(mode="after")
    def _logs_only_for_jobs(self) -> Subscribe:
        if self.project is not None and self.after_logs is not None:
            raise ValueError("after_logs applies to job subscriptions only")
        return self


class Unsubscribe(_Target):
    """``{"op": "unsubscribe", "job_id": "..."}`` or ``{"op": "unsubscribe", "project": "..."}``."""

    op: Literal["unsubscribe"]


class _WithTicket(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ticket: str = Field(..., repr=False, description="The JWT from ``POST /api/v1/ws-tickets``; never logged.")


class Auth(_WithTicket):
    """``{"op": "auth", "ticket": "..."}``: the first frame of a socket that sent no ticket in its handshake."""

    op: Literal["auth"]


class Renew(_WithTicket):
    """``{"op": "renew", "ticket": "..."}``: a fresh ticket before the socket's ``expires_at``."""

    op: Literal["renew"]


Op = Subscribe | Unsubscribe | Auth | Renew
_OP: TypeAdapter[Op] = TypeAdapter(Annotated[Op, Field(discriminator="op")])
OPS = "auth, renew, subscribe, unsubscribe"


def parse_op(text: str) -> Op:
    """Parse one client message.

    Raises:
        ValueError: with a short reason fit to send back to the client (never the ticket it carried).

    Example:
        >>> parse_op('{"op": "explode"}')
        Traceback (most recent call last):
        ...
        ValueError: unknown op: expected one of auth, renew, subscribe, unsubscribe
    """
    try:
        return _OP.validate_json(text)
    except ValidationError as exc:
        raise ValueError(_reason(exc)) from None


def job_socket_op(job_id: str, query: Mapping[str, str]) -> Subscribe:
    """The subscription a single-job socket's path and query ask for.

    Raises:
        ValueError: a bad job id or query parameter (non-numeric, negative or too large cursor), fit for the client.

    Example:
        >>> job_socket_op("j-1", {"after_events": "118", "heartbeats": "1"}).after_events
        118
        >>> job_socket_op("j-1", {"after_logs": "-1"})
        Traceback (most recent call last):
        ...
        ValueError: after_logs: Input should be greater than or equal to 0
    """
    fields: dict[str, object] = {"op": "subscribe", "job_id": job_id}
    fields |= {name: query[name] for name in ("after_events", "after_logs", "heartbeats") if name in query}
    try:
        return Subscribe.model_validate(fields)
    except ValidationError as exc:
        raise ValueError(_reason(exc)) from None


def _reason(exc: ValidationError) -> str:
    first = exc.errors()[0]
    if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        return f"unknown op: expected one of {OPS}"
    where = ".".join(str(p) for p in first["loc"])
    msg = str(first["msg"]).removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


# -- policies -----------------------------------------------------------------------------------------------------


def origin_allowed(origin: str | None, allowed: Sequence[str], *, listed_only: bool = False) -> bool:
    """Whether a WebSocket handshake may proceed.

    Only browsers send ``Origin`` and only browsers can be abused cross-site, so a handshake without one
    (CLI, scripts) passes; its ticket, not Origin, is what guards it. An empty ``allowed`` means no check,
    unless ``listed_only`` (auth on): then no browser origin at all.

    Example:
        >>> origin_allowed("https://evil.example", []), origin_allowed("https://evil.example", [], listed_only=True)
        (True, False)
    """
    if origin is None:
        return True
    if not allowed:
        return not listed_only
    return origin.rstrip("/") in {a.rstrip("/") for a in allowed}


class SeqGate:
    """Lets through strictly increasing stream sequences only.

    An ordered consumer that is recreated (missed heartbeats, NATS reconnect, or a reset before its first
    message) may redeliver from an earlier sequence; the gate turns that into exactly-once for the client.
    """

    def __init__(self, after: int | None = None) -> None:
        self.last = after or 0

    def accept(self, seq: int) -> bool:
        if seq <= self.last:
            return False
        self.last = seq
        return True


@dataclass(slots=True)  # not frozen: one is made per message and client, and a frozen one costs 8x more to make
class Outgoing:
    """One queued WebSocket text (never changed once made); events carry where they came from so that the sent
    cursor can advance, and whether they are live or replayed with when JetStream stored them (for the metrics)."""

    text: str
    sub: str | None = None
    stream: str | None = None
    seq: int | None = None
    origin: str = "control"  # "live", "replay" or "control"
    stored_at: float | None = None  # Unix time JetStream stored the event


class Outbox:
    """Bounded queue between the NATS callbacks of one client (producers) and its sender task (consumer).

    Policy: producers never wait. When the queue is full the outbox latches ``overflowed`` and refuses
    everything after, so the client is disconnected and resumes from its cursor: no silent loss, no gap,
    and one slow client costs at most ``capacity`` messages of memory.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._queue: asyncio.Queue[Outgoing] = asyncio.Queue(maxsize=capacity)
        self.overflowed = asyncio.Event()
        self._sent: dict[str, dict[str, int | None]] = {}

    def register(self, sub: str, cursor: dict[str, int | None]) -> None:
        """Start tracking a subscription from the cursor the client gave (``None``: from the beginning)."""
        self._sent[sub] = dict(cursor)

    def forget(self, sub: str) -> None:
        self._sent.pop(sub, None)

    def offer(self, item: Outgoing) -> bool:
        """Queue ``item`` unless full or already overflowed; never blocks."""
        if self.overflowed.is_set():
            return False
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self.overflowed.set()
            return False
        return True

    def overflow(self) -> None:
        """Latch ``overflowed`` from outside the queue (a replay whose live buffer ran over ``capacity``)."""
        self.overflowed.set()

    async def get(self) -> Outgoing:
        return await self._queue.get()

    def qsize(self) -> int:
        return self._queue.qsize()

    def mark_sent(self, item: Outgoing) -> None:
        """Advance the sent cursor once the socket took ``item``."""
        streams = self._sent.get(item.sub or "")
        if streams is not None and item.stream is not None:
            streams[item.stream] = item.seq

    def cursor(self) -> dict[str, dict[str, int | None]]:
        """Per subscription and stream, the last sequence handed to the socket (or the starting cursor)."""
        return {sub: dict(streams) for sub, streams in self._sent.items()}
