"""The notifier's WebSocket protocol without I/O (docs/websocket.md): subscriptions, cursors, tickets, backoff.

One :class:`Watch` holds what a live iteration follows (jobs, projects) and the last stream sequence it got of
each; after any disconnect the client subscribes again *after* those cursors, so the notifier's replay fills the gap
exactly, and anything at or below a cursor is dropped here. ``Kiln.watch`` and ``AsyncKiln.watch`` do the I/O.
"""

from __future__ import annotations

import base64
import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from kiln_contracts.tickets import CLOSE_UNAUTHORIZED, SUBPROTOCOL, TICKET_SUBPROTOCOL_PREFIX
from pydantic import ValidationError

from .errors import KilnError
from .models import LiveEvent

MAX_HEADER_TICKET = 4096  # a handshake header line holds at most 8 KiB: a longer ticket goes in the first frame
RETRY_SUBSCRIBE_S = 2.0  # the notifier could not reach NATS for a subscription: ask again after this
RETRY_RENEWAL_S = 5.0  # a renewal was refused (the socket keeps its deadline): try again after this
CLOSE_POLICY = 1008  # a request that fails again as is: never retried
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def notifier_url(configured: str, api_url: str) -> str:
    """The notifier's URL as seen from here, from the API's ``/config`` (like the web page's ``notifierUrl``).

    A loopback notifier behind a remote API is on the API's host; an https API means wss.

    >>> notifier_url("ws://127.0.0.1:8001", "https://kiln.example")
    'wss://kiln.example:8001'
    >>> notifier_url("ws://127.0.0.1:8001/", "http://127.0.0.1:8000")
    'ws://127.0.0.1:8001'
    """
    url, api = urlsplit(configured.rstrip("/")), urlsplit(api_url)
    scheme = {"http": "ws", "https": "wss"}.get(url.scheme, url.scheme)
    if api.scheme == "https" and scheme == "ws":
        scheme = "wss"
    netloc = url.netloc
    if url.hostname in _LOOPBACK and api.hostname not in _LOOPBACK and api.hostname:
        netloc = api.hostname + (f":{url.port}" if url.port else "")
    return urlunsplit((scheme, netloc, url.path, "", ""))


def offer(ticket: str | None) -> tuple[list[str], dict[str, str] | None]:
    """Subprotocols to offer and the first frame to send: the ticket in the handshake, a long one as the first frame;
    never in the URL (URLs end up in access logs).

    >>> offer("abc")
    (['kiln.v1', 'kiln.ticket.abc'], None)
    >>> offer(None)
    (['kiln.v1'], None)
    """
    if ticket is None:
        return [SUBPROTOCOL], None
    if len(ticket) > MAX_HEADER_TICKET:
        return [SUBPROTOCOL], {"op": "auth", "ticket": ticket}
    return [SUBPROTOCOL, TICKET_SUBPROTOCOL_PREFIX + ticket], None


def issued_at(ticket: str) -> int | None:
    """The issue time (Unix seconds) written in a ticket (a JWT, read without checking it); None if unreadable."""
    try:
        part = ticket.split(".")[1]
        payload = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
        return int(payload["iat"])
    except (IndexError, ValueError, KeyError, TypeError):
        return None


def renew_after_s(ticket: str, renew_within_s: float, notifier_expires_at: float | None = None) -> float:
    """Seconds after fetching ``ticket`` at which to renew: 80 % of the shorter of the API's ``renew_within_s`` and
    the notifier's own allowance (its ``expires_at`` minus the ticket's issue time: two server clocks, so a local
    clock that is off changes nothing).

    >>> renew_after_s("x", 300), renew_after_s("x", 300, 1000.0)
    (240.0, 240.0)
    """
    window = float(renew_within_s)
    iat = issued_at(ticket)
    if iat is not None and notifier_expires_at is not None and notifier_expires_at > iat:
        window = min(window, notifier_expires_at - iat)
    return max(1.0, window * 0.8)


def reconnect_delay(code: int | None, attempt: int, rng: random.Random | None = None) -> float:
    """How long to wait before connecting again after a close ``code`` (None: no close frame, a network error).

    4401 (ticket ran out) and 1013 (fell behind) after a working connection come back at once; anything else, or
    again, backs off from 0.5 s doubling to 30 s, with jitter. 1008 is never retried.

    >>> reconnect_delay(4401, 0), reconnect_delay(None, 10, random.Random(0)) <= 37.5
    (0.2, True)
    """
    if code == CLOSE_POLICY:
        raise NotifierRefused(None, "the notifier refused the request (1008); it would fail again as is")
    if code in (CLOSE_UNAUTHORIZED, 1013) and attempt == 0:
        return 0.2
    return float(min(30.0, 0.5 * 2 ** min(attempt, 10)) * (0.75 + (rng or random).random() / 2))


def after_drop(code: int | None, attempt: int, heard: bool, deadline: float | None,
               on_drop: Callable[[int | None, float], None] | None) -> tuple[float, int]:
    """After a dropped socket: how long to wait and the next attempt number (a socket that delivered something
    starts the count again); raises :class:`WatchTimeout` when the wait would pass ``deadline`` (monotonic).

    >>> after_drop(4401, 3, True, None, None)
    (0.2, 1)
    """
    if heard:
        attempt = 0
    delay = reconnect_delay(code, attempt)
    if on_drop is not None:
        on_drop(code, delay)
    if deadline is not None and time.monotonic() + delay >= deadline:
        raise WatchTimeout()
    return delay, attempt + 1


class NotifierRefused(KilnError):
    """The notifier refused a subscription in a way no retry fixes (a bad id, too many subscriptions)."""


class WatchTimeout(TimeoutError):
    """A watch's ``timeout`` passed before the caller stopped iterating."""

    def __init__(self) -> None:
        super().__init__("the watch timed out")


@dataclass
class Sub:
    key: str
    target: dict[str, str]
    cursor: dict[str, int | None] = field(default_factory=lambda: {"events": None, "logs": None})


@dataclass
class Step:
    """What one notifier message asks of the I/O loop."""

    event: LiveEvent | None = None
    deadline: float | None = None  # authorized / renewed: the notifier's deadline (Unix seconds)
    renew: bool = False  # a subscription the ticket lacks: renew with a wider ticket now
    resubscribe: str | None = None  # subscribe this key again after RETRY_SUBSCRIBE_S
    retry_renewal: bool = False  # the renewal was refused; the socket keeps its deadline


class Watch:
    """The subscriptions of one live iteration and their cursors.

    ``after`` resumes: ``{"job:j-1": {"after_events": 118, "after_logs": 7}}``. A job without a cursor replays its
    whole history; a project without one starts with its next event.

    Example:
        >>> w = Watch(jobs=["j-1"], after={"job:j-1": {"after_events": 5}})
        >>> w.subscribe_ops()
        [{'op': 'subscribe', 'job_id': 'j-1', 'after_events': 5}]
        >>> msg = {"type": "event", "sub": "job:j-1", "stream": "events", "seq": 5, "event": {}}
        >>> w.handle(msg).event is None  # at or below the cursor: already had
        True
    """

    def __init__(self, jobs: Sequence[str] = (), projects: Sequence[str] = (),
                 after: Mapping[str, Mapping[str, int]] | None = None, heartbeats: bool = False) -> None:
        if not jobs and not projects:
            raise ValueError("watch at least one job or project")
        self.heartbeats = heartbeats
        self.subs: dict[str, Sub] = {}
        for kind, names in (("job", jobs), ("project", projects)):
            for name in names:
                key = f"{kind}:{name}"
                sub = Sub(key, {"job_id": name} if kind == "job" else {"project": name})
                for stream in ("events", "logs"):
                    sub.cursor[stream] = (after or {}).get(key, {}).get(f"after_{stream}")
                self.subs[key] = sub

    def scope(self) -> dict[str, list[str]]:
        """The ticket request naming every subscription."""
        return {"jobs": [s.target["job_id"] for s in self.subs.values() if "job_id" in s.target],
                "projects": [s.target["project"] for s in self.subs.values() if "project" in s.target]}

    def cursors(self) -> dict[str, dict[str, int]]:
        """Where each subscription stands, in the shape ``after`` takes."""
        return {k: {f"after_{st}": n for st, n in s.cursor.items() if n is not None} for k, s in self.subs.items()}

    def subscribe_op(self, key: str) -> dict[str, Any]:
        sub = self.subs[key]
        op: dict[str, Any] = {"op": "subscribe", **sub.target}
        if sub.cursor["events"] is not None:
            op["after_events"] = sub.cursor["events"]
        if "job_id" in sub.target and sub.cursor["logs"] is not None:
            op["after_logs"] = sub.cursor["logs"]
        if self.heartbeats:
            op["heartbeats"] = True
        return op

    def subscribe_ops(self) -> list[dict[str, Any]]:
        return [self.subscribe_op(k) for k in self.subs]

    def handle(self, msg: Mapping[str, Any]) -> Step:
        """One message from the notifier; a refusal that retrying cannot fix raises :class:`KilnError`."""
        kind, key = msg.get("type"), msg.get("sub")
        if kind in ("authorized", "renewed"):
            return Step(deadline=float(msg["expires_at"]) if msg.get("expires_at") is not None else None)
        sub = self.subs.get(key) if isinstance(key, str) else None
        if kind == "event" and sub is not None:
            return Step(event=self._event(sub, msg))
        if kind != "error":
            return Step()  # subscribed, unsubscribed, overflow (a 1013 close follows): nothing to do
        reason = str(msg.get("reason", ""))
        if sub is None:
            return Step(retry_renewal=reason.startswith("renewal refused"))
        if "not covered by this ticket" in reason:
            return Step(renew=True)
        if "retry later" in reason:
            return Step(resubscribe=sub.key)
        if "already subscribed" in reason:
            return Step()
        raise NotifierRefused(None, f"the notifier refused {sub.key}: {reason}")

    def _event(self, sub: Sub, msg: Mapping[str, Any]) -> LiveEvent | None:
        stream, seq = msg.get("stream"), msg.get("seq")
        if stream not in ("events", "logs") or not isinstance(seq, int):
            return None
        last = sub.cursor[stream]
        if last is not None and seq <= last:
            return None  # a replay overlapping what we had
        sub.cursor[stream] = seq
        try:
            return LiveEvent.model_validate({"sub": sub.key, "stream": stream, "seq": seq, "event": msg["event"]})
        except (ValidationError, KeyError):
            return None  # a kind or version this client does not know: skipped, the cursor still moves on


@dataclass
class Grant:
    """The socket's current ticket and when it was fetched (monotonic seconds)."""

    ticket: str
    renew_within_s: float
    fetched_at: float


class Schedule:
    """When the I/O loop must act without a message: renew the ticket, subscribe a key again, or give up."""

    def __init__(self, grant: Grant | None, deadline: float | None = None) -> None:
        self.grant, self.deadline = grant, deadline
        self.renew_at = None if grant is None else grant.fetched_at + renew_after_s(grant.ticket, grant.renew_within_s)
        self.subscribe_at: dict[str, float] = {}
        self.heard = False  # the notifier answered on this socket: the next drop starts the backoff afresh

    def wait(self, now: float) -> float | None:
        """Seconds until the next thing is due (None: nothing, wait for messages)."""
        times = [t for t in (self.renew_at, self.deadline, *self.subscribe_at.values()) if t is not None]
        return max(0.0, min(times) - now) if times else None

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def renew_due(self, now: float) -> bool:
        return self.grant is not None and self.renew_at is not None and now >= self.renew_at

    def resubscribe_due(self, now: float) -> list[str]:
        keys = [k for k, t in self.subscribe_at.items() if now >= t]
        for k in keys:
            del self.subscribe_at[k]
        return keys

    def renewed(self, grant: Grant) -> None:
        self.grant = grant
        self.renew_at = grant.fetched_at + renew_after_s(grant.ticket, grant.renew_within_s)

    def apply(self, step: Step, now: float) -> None:
        """Timers a message sets: the notifier's deadline (renew before it), a refused renewal, a subscription to
        retry."""
        self.heard = self.heard or not (step.renew or step.resubscribe or step.retry_renewal)
        if step.deadline is not None and self.grant is not None:
            self.renew_at = self.grant.fetched_at + renew_after_s(self.grant.ticket, self.grant.renew_within_s,
                                                                  step.deadline)
        if step.retry_renewal and self.grant is not None:
            self.renew_at = now + RETRY_RENEWAL_S
        if step.renew:
            self.renew_at = now
        if step.resubscribe is not None:
            self.subscribe_at[step.resubscribe] = now + RETRY_SUBSCRIBE_S


def retriable(exc: KilnError) -> bool:
    """Whether a refusal may go away by itself (the API or the network down, overloaded) rather than never."""
    if isinstance(exc, NotifierRefused):
        return False
    return exc.status is None or exc.status >= 500 or exc.status in (408, 429)
