"""The I/O of ``Kiln.watch``: one notifier socket at a time, websockets' sync client (it answers pings on its own
thread); the rules are :mod:`kiln_client.live`'s."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.sync.client import ClientConnection, connect

from .errors import KilnError
from .live import Grant, Schedule, Watch, WatchTimeout, after_drop, offer, retriable
from .models import LiveEvent

if TYPE_CHECKING:
    from .client import Kiln


def grant(kiln: Kiln, watch: Watch) -> Grant | None:
    """A ticket for every subscription; None when the API issues none (503: the notifier runs without auth)."""
    try:
        t = kiln.ticket(**watch.scope())
    except KilnError as exc:
        if exc.status == 503:
            return None
        raise
    return Grant(t.ticket, t.renew_within_s, time.monotonic())


def iterate(kiln: Kiln, watch: Watch, timeout: float | None,
            on_drop: Callable[[int | None, float], None] | None = None) -> Iterator[LiveEvent]:
    deadline = None if timeout is None else time.monotonic() + timeout
    attempt = 0
    while True:
        code: int | None = None
        plan: Schedule | None = None
        try:
            g = grant(kiln, watch)
            protocols, first = offer(g.ticket if g else None)
            with connect(kiln.notifier_url + "/api/v1/ws", subprotocols=protocols,  # type: ignore[arg-type]
                         compression=None, max_size=None, open_timeout=10) as ws:
                if first:
                    ws.send(json.dumps(first))
                for op in watch.subscribe_ops():
                    ws.send(json.dumps(op))
                plan = Schedule(g, deadline)
                yield from _session(kiln, watch, ws, plan)
        except WatchTimeout:
            raise
        except ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd else None
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status < 500:
                raise KilnError(status, f"the notifier at {kiln.notifier_url} refused the connection") from None
        except KilnError as exc:
            if not retriable(exc):
                raise
        except (OSError, WebSocketException):
            pass
        delay, attempt = after_drop(code, attempt, plan is not None and plan.heard, deadline, on_drop)
        time.sleep(delay)


def _session(kiln: Kiln, watch: Watch, ws: ClientConnection, plan: Schedule) -> Iterator[LiveEvent]:
    """Messages of one socket until it closes (``ConnectionClosed``) or the deadline passes."""
    while True:
        now = time.monotonic()
        if plan.expired(now):
            raise WatchTimeout()
        if plan.renew_due(now):
            g = grant(kiln, watch)
            if g is None:
                plan.renew_at = None  # the API stopped issuing tickets: the notifier decides
            else:
                ws.send(json.dumps({"op": "renew", "ticket": g.ticket}))
                plan.renewed(g)
        for key in plan.resubscribe_due(now):
            ws.send(json.dumps(watch.subscribe_op(key)))
        try:
            raw = ws.recv(timeout=plan.wait(time.monotonic()))
        except TimeoutError:
            continue
        try:
            msg = json.loads(raw)
        except ValueError:
            continue
        step = watch.handle(msg)
        plan.apply(step, time.monotonic())
        if step.event is not None:
            yield step.event
