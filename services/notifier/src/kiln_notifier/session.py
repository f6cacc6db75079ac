"""One WebSocket client: its outbox, its sender task, its subscriptions, and how it ends.

Live messages come from the process's shared feeds (one per watched subject, see ``adapters.jetstream``); a
client replays its history with its own consumers first. Three tasks per client: the sender drains the outbox
into the socket, the receiver reads the client's operations (and notices it leaving), and a watcher waits for
an overflow. Whichever ends first ends the session; the client leaves its feeds and drops its replay consumers
before anything else so that nothing keeps queueing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from starlette.status import WS_1008_POLICY_VIOLATION, WS_1011_INTERNAL_ERROR, WS_1013_TRY_AGAIN_LATER
from starlette.websockets import WebSocket, WebSocketDisconnect

from .adapters.jetstream import Fanout, Relay
from .domain import (
    Outbox,
    Outgoing,
    Subscribe,
    error_message,
    overflow_message,
    parse_op,
    subscribed_message,
    unsubscribed_message,
)
from .settings import NotifierSettings

log = logging.getLogger(__name__)

OnText = Callable[[str], Awaitable[None]]


class Session:
    """The server side of one accepted WebSocket."""

    def __init__(self, ws: WebSocket, fanout: Fanout, settings: NotifierSettings) -> None:
        self.ws = ws
        self.settings = settings
        self.outbox = Outbox(settings.client_queue)
        self.relay = Relay(fanout, self.outbox)

    def say(self, text: str) -> None:
        """Queue a control message behind the events already queued (so the client sees them in order)."""
        self.outbox.offer(Outgoing(text))

    def announce(self, key: str, cursor: dict[str, int | None]) -> None:
        self.say(subscribed_message(key, cursor))

    async def subscribe(self, op: Subscribe) -> tuple[str, int] | None:
        """Open one subscription; on failure return (reason, close code) for the caller to answer."""
        try:
            if op.job_id is not None:
                await self.relay.subscribe_job(
                    op.job_id, op.after_events, op.after_logs, heartbeats=op.heartbeats, on_ready=self.announce)
            else:
                await self.relay.subscribe_project(
                    op.project or "", op.after_events, heartbeats=op.heartbeats, on_ready=self.announce)
            return None
        except ValueError as exc:
            failure = (str(exc), WS_1008_POLICY_VIOLATION)
        except Exception as exc:  # noqa: BLE001 - NATS down or slow: the client may retry, the socket lives on
            log.warning("subscribe %s failed: %r", op.key, exc)
            failure = (f"subscription failed, retry later: {type(exc).__name__}", WS_1013_TRY_AGAIN_LATER)
        return failure

    async def handle_op(self, text: str) -> None:
        """One client message on the multi-job socket: subscribe or unsubscribe; errors are answered."""
        try:
            op = parse_op(text)
        except ValueError as exc:
            self.say(error_message(str(exc)))
            return
        if isinstance(op, Subscribe):
            if op.key not in self.relay and len(self.relay) >= self.settings.max_subscriptions:
                self.say(error_message(f"at most {self.settings.max_subscriptions} subscriptions", sub=op.key))
                return
            failure = await self.subscribe(op)
            if failure is not None:  # answered; unlike the single-job socket, this one stays open
                self.say(error_message(failure[0], sub=op.key))
        elif await self.relay.unsubscribe(op.key):
            self.say(unsubscribed_message(op.key))
        else:
            self.say(error_message("not subscribed", sub=op.key))

    async def run(self, on_text: OnText | None = None, opening: Subscribe | None = None) -> None:
        """Serve until the client leaves, the socket fails, the outbox overflows or ``opening`` fails.

        The sender runs before the first subscription opens: a replayed history then streams out as it
        arrives instead of piling up in the outbox.
        """
        tasks = {
            asyncio.create_task(self._send_loop(), name="sender"),
            asyncio.create_task(self._receive_loop(on_text), name="receiver"),
            asyncio.create_task(self.outbox.overflowed.wait(), name="overflow"),
        }
        failure = None
        try:
            if opening is not None:
                failure = await self.subscribe(opening)
            if failure is None:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await self.relay.close()
            for task in tasks:
                task.cancel()
            # Collect every task so no exception goes unretrieved; a failed send means the client is gone.
            await asyncio.gather(*tasks, return_exceptions=True)
        if failure is not None:
            await self._close(error_message(failure[0]), failure[1], failure[0][:120])
        elif self.outbox.overflowed.is_set():
            await self._close(overflow_message(self.outbox.cursor()), WS_1013_TRY_AGAIN_LATER, "too slow; resume")

    async def fail(self, reason: str, code: int = WS_1011_INTERNAL_ERROR) -> None:
        """Tell the client why and close (a handshake that passed Origin but asks for nonsense)."""
        await self._close(error_message(reason), code, reason[:120])

    async def _send_loop(self) -> None:
        while True:
            item = await self.outbox.get()
            await self.ws.send_text(item.text)
            self.outbox.mark_sent(item)

    async def _receive_loop(self, on_text: OnText | None) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is not None and on_text is not None:
                await on_text(text)

    async def _close(self, notice: str, code: int, reason: str) -> None:
        # A client that stopped reading cannot take these until it reads again: bounded, then give up.
        try:
            async with asyncio.timeout(self.settings.close_timeout_s):
                await self.ws.send_text(notice)
                await self.ws.close(code=code, reason=reason)
        except (TimeoutError, WebSocketDisconnect, RuntimeError, OSError) as exc:
            log.info("closing client %s without notice: %r", self.ws.client, exc)
