"""One WebSocket client: its grant, its outbox, its sender task, its subscriptions, and how it ends.

Live messages come from the process's shared feeds (one per watched subject, see ``adapters.jetstream``); a
client replays its history with its own consumers first. Up to five tasks per client: the sender drains the
outbox into the socket, the receiver reads the client's operations (and notices it leaving), a watcher waits for
an overflow, another for :meth:`Session.end`, and with auth on one more for the grant's deadline. Whichever ends
first ends the session; the client leaves its feeds and drops its replay consumers before anything else so that
nothing keeps queueing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from kiln_contracts.tickets import CLOSE_UNAUTHORIZED
from starlette.status import WS_1008_POLICY_VIOLATION, WS_1011_INTERNAL_ERROR, WS_1013_TRY_AGAIN_LATER
from starlette.websockets import WebSocket, WebSocketDisconnect

from .adapters.jetstream import Fanout, Relay
from .auth import (
    FIRST_FRAME,
    HOW_TO_SEND,
    Grant,
    Tickets,
    Unauthorized,
    authorized_message,
    covers,
    not_covered,
    renewed_message,
)
from .domain import (
    Auth,
    Op,
    Outbox,
    Outgoing,
    Renew,
    Subscribe,
    error_message,
    overflow_message,
    parse_op,
    subscribed_message,
    unsubscribed_message,
)
from .metrics import NotifierMetrics
from .settings import NotifierSettings

log = logging.getLogger(__name__)

OnText = Callable[[str], Awaitable[None]]
BINARY = "binary frames are not supported; send JSON text"
ALREADY = 'already authorized: send a fresh ticket as {"op": "renew", "ticket": "..."}'
NOT_RENEWED = "ticket not renewed in time: reconnect with a new ticket and your cursors"
AUTH_OFF = "authentication is off on this notifier: no ticket to send"


class Session:
    """The server side of one accepted WebSocket."""

    def __init__(self, ws: WebSocket, fanout: Fanout, settings: NotifierSettings, tickets: Tickets | None,
                 metrics: NotifierMetrics | None = None) -> None:
        self.ws = ws
        self.metrics = metrics
        self.settings = settings
        self.tickets = tickets  # None: auth off
        self.grant: Grant | None = None
        self.held: dict[str, str] = {}  # open subscription -> the project whose subjects it reads
        self.outbox = Outbox(settings.client_queue)
        self.relay = Relay(fanout, self.outbox)
        self._end: tuple[str, int] | None = None
        self._ended = asyncio.Event()

    def say(self, text: str) -> None:
        """Queue a control message behind the events already queued (so the client sees them in order)."""
        self.outbox.offer(Outgoing(text))

    def announce(self, key: str, cursor: dict[str, int | None]) -> None:
        self.say(subscribed_message(key, cursor))

    def end(self, reason: str, code: int) -> None:
        """End the session with an ``error`` saying ``reason`` and a close ``code`` (the first call wins)."""
        if self._end is None:
            self._end = (reason, code)
        self._ended.set()

    # -- authorisation ------------------------------------------------------------------------------------------

    async def authorize(self, token: str | None) -> bool:
        """Check the handshake's ticket, else wait for the first frame's; refused: answer, close, return False."""
        if self.tickets is None:
            return True
        try:
            if token is None:
                token = await self._first_frame_ticket()
                if token is None:
                    return False  # the client left
            self.grant = self.tickets.grant(token)
        except Unauthorized as exc:
            await self.fail(exc.reason, CLOSE_UNAUTHORIZED)
            return False
        self.say(authorized_message(self.grant.expires_at))
        return True

    async def _first_frame_ticket(self) -> str | None:
        try:
            async with asyncio.timeout(self.settings.auth_timeout_s):
                message = await self.ws.receive()
        except TimeoutError:
            raise Unauthorized(
                f"no ticket within {self.settings.auth_timeout_s:g} s: {HOW_TO_SEND} {FIRST_FRAME}") from None
        if message["type"] == "websocket.disconnect":
            return None
        text = message.get("text")
        if text is None:
            raise Unauthorized(f"{BINARY}; the first frame must be {FIRST_FRAME}")
        try:
            op = parse_op(text)
        except ValueError as exc:
            raise Unauthorized(f"{exc}; the first frame must be {FIRST_FRAME}") from None
        if not isinstance(op, Auth):
            raise Unauthorized(f"not authorized yet: the first frame must be {FIRST_FRAME}")
        return op.ticket

    def renew(self, token: str) -> None:
        """Take a fresh ticket: answered ``renewed``, or an ``error`` (the socket keeps its deadline), or 4401."""
        if self.tickets is None or self.grant is None:
            self.say(error_message(AUTH_OFF))
            return
        try:
            self.grant = self.tickets.renew(self.grant, token, self.held)
        except Unauthorized as exc:
            self.end(exc.reason, CLOSE_UNAUTHORIZED)
            return
        except ValueError as exc:  # an invalid or stale ticket: the one the socket holds stands until its deadline
            self.say(error_message(f"renewal refused: {exc}"))
            return
        self.say(renewed_message(self.grant.expires_at))

    def refused(self, op: Subscribe) -> str | None:
        """Why the grant does not let this socket open ``op`` (``None``: it does, or auth is off)."""
        if self.grant is None or covers(self.grant.ticket, op.key) is not None:
            return None
        return not_covered(op.key)

    # -- operations ---------------------------------------------------------------------------------------------

    async def subscribe(self, op: Subscribe) -> tuple[str, int] | None:
        """Open one subscription; on failure return (reason, close code) for the caller to answer."""
        project = "*"  # any project: auth off only
        if self.grant is not None:
            granted = covers(self.grant.ticket, op.key)
            if granted is None:
                return not_covered(op.key), CLOSE_UNAUTHORIZED
            project = granted  # a job is read on exactly the project its ticket names
        try:
            if op.job_id is not None:
                await self.relay.subscribe_job(
                    op.job_id, op.after_events, op.after_logs, project=project, heartbeats=op.heartbeats,
                    on_ready=self.announce)
            else:
                await self.relay.subscribe_project(
                    op.project or "", op.after_events, heartbeats=op.heartbeats, on_ready=self.announce)
            self.held[op.key] = project
            return None
        except ValueError as exc:
            failure = (str(exc), WS_1008_POLICY_VIOLATION)
        except Exception as exc:  # noqa: BLE001 - NATS down or slow: the client may retry, the socket lives on
            log.warning("subscribe %s failed: %r", op.key, exc)
            failure = (f"subscription failed, retry later: {type(exc).__name__}", WS_1013_TRY_AGAIN_LATER)
        return failure

    def _parse(self, text: str) -> Op | None:
        try:
            return parse_op(text)
        except ValueError as exc:
            self.say(error_message(str(exc)))
            return None

    async def handle_op(self, text: str) -> None:
        """One client message on the multi-job socket; each is answered and only a failed renewal closes it."""
        op = self._parse(text)
        if op is None:
            return
        if isinstance(op, Renew):
            self.renew(op.ticket)
        elif isinstance(op, Auth):
            self.say(error_message(ALREADY if self.tickets is not None else AUTH_OFF))
        elif isinstance(op, Subscribe):
            if op.key not in self.relay and len(self.relay) >= self.settings.max_subscriptions:
                self.say(error_message(f"at most {self.settings.max_subscriptions} subscriptions", sub=op.key))
                return
            failure = await self.subscribe(op)
            if failure is not None:  # answered; unlike the single-job socket, this one stays open
                self.say(error_message(failure[0], sub=op.key))
        elif await self.relay.unsubscribe(op.key):
            self.held.pop(op.key, None)
            self.say(unsubscribed_message(op.key))
        else:
            self.say(error_message("not subscribed", sub=op.key))

    async def handle_job_op(self, text: str) -> None:
        """One client message on the single-job socket: only ``renew`` is an operation there; the rest is answered."""
        op = self._parse(text)
        if isinstance(op, Renew):
            self.renew(op.ticket)
        elif isinstance(op, Auth):
            self.say(error_message(ALREADY if self.tickets is not None else AUTH_OFF))
        elif op is not None:
            self.say(error_message(f"{op.op}: this socket watches one job and takes only renew; use /api/v1/ws"))

    # -- life cycle ---------------------------------------------------------------------------------------------

    async def run(self, on_text: OnText, opening: Subscribe | None = None) -> None:
        """Serve until the client leaves, the socket fails, the outbox overflows, the grant runs out or
        ``opening`` fails.

        The sender runs before the first subscription opens: a replayed history then streams out as it
        arrives instead of piling up in the outbox.
        """
        tasks = {
            asyncio.create_task(self._send_loop(), name="sender"),
            asyncio.create_task(self._receive_loop(on_text), name="receiver"),
            asyncio.create_task(self.outbox.overflowed.wait(), name="overflow"),
            asyncio.create_task(self._ended.wait(), name="ended"),
        }
        if self.grant is not None:
            tasks.add(asyncio.create_task(self._watch_deadline(), name="deadline"))
        if self.metrics is not None:
            self.metrics.clients += 1
        try:
            if opening is not None:
                failure = await self.subscribe(opening)
                if failure is not None:
                    self.end(*failure)
            if self._end is None:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await self.relay.close()
            for task in tasks:
                task.cancel()
            # Collect every task so no exception goes unretrieved; a failed send means the client is gone.
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.metrics is not None:
                self.metrics.clients -= 1
        if self._end is not None:
            reason, code = self._end
            await self._close(error_message(reason), code, reason[:120])
        elif self.outbox.overflowed.is_set():
            if self.metrics is not None:
                self.metrics.cut_off.inc()
            await self._close(overflow_message(self.outbox.cursor()), WS_1013_TRY_AGAIN_LATER, "too slow; resume")

    async def fail(self, reason: str, code: int = WS_1011_INTERNAL_ERROR) -> None:
        """Tell the client why and close (a refused ticket, a bad query) before the session runs."""
        await self._close(error_message(reason), code, reason[:120])

    async def _send_loop(self) -> None:
        metrics = self.metrics
        while True:
            item = await self.outbox.get()
            await self.ws.send_text(item.text)
            self.outbox.mark_sent(item)
            if metrics is not None:  # plain numbers: this runs per message and client
                metrics.sent.inc(item.origin)
                if item.origin == "live" and item.stored_at is not None:
                    metrics.latency.observe(time.time() - item.stored_at)

    async def _receive_loop(self, on_text: OnText) -> None:
        while self._end is None:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                self.say(error_message(BINARY))
            else:
                await on_text(text)

    async def _watch_deadline(self) -> None:
        # A renewal moves the deadline while this sleeps: look again before ending the session.
        while self.grant is not None:
            left = self.grant.expires_at - time.time()
            if left <= 0:
                self.end(NOT_RENEWED, CLOSE_UNAUTHORIZED)
                return
            await asyncio.sleep(left)

    async def _close(self, notice: str, code: int, reason: str) -> None:
        # A client that stopped reading cannot take these until it reads again: bounded, then give up.
        try:
            async with asyncio.timeout(self.settings.close_timeout_s):
                await self.ws.send_text(notice)
                await self.ws.close(code=code, reason=reason)
        except (TimeoutError, WebSocketDisconnect, RuntimeError, OSError) as exc:
            log.info("closing client %s without notice: %r", self.ws.client, exc)
