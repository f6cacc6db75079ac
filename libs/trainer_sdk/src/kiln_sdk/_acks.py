"""Pipelined JetStream publishing with one reply subscription: the publisher thread's hot path.

``JetStreamContext.publish_async`` costs a future, a semaphore, a random token and a JSON-parsed ``PubAck`` per
message; on a 2-core machine that caps one process near 15-20k events/s.  Here every message is a core publish
whose reply subject is ``<inbox>.<n>``; a single wildcard subscription on ``<inbox>.*`` matches each ack to its
message by ``n`` and only parses the ack when it carries an error.  The same acks, the same guarantees (the server
stores a message once per ``Nats-Msg-Id``), about twice the rate.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

from nats.errors import NoRespondersError
from nats.js.errors import APIError

from ._events import Message


class InflightBatch:
    """Messages published by :meth:`AckPublisher.start` whose acks may still be on their way."""

    __slots__ = ("messages", "errors", "_left", "_done", "_owner", "_tokens", "_t0")

    def __init__(self, owner: "AckPublisher", messages: Sequence[Message]) -> None:
        self.messages = messages
        self.errors: list[BaseException | None] = [None] * len(messages)
        self._left = len(messages)
        self._done = asyncio.get_running_loop().create_future()
        self._owner = owner
        self._tokens: range = range(0)
        self._t0 = asyncio.get_running_loop().time()

    def _acked(self, index: int, error: BaseException | None) -> None:
        if error is not None:
            self.errors[index] = error
        self._left -= 1
        if self._left <= 0 and not self._done.done():
            self._done.set_result(None)

    async def settle(self, timeout: float) -> list[BaseException | None]:
        """Wait up to ``timeout`` s (from the publish) for every ack; one entry per message, ``None`` = acked."""
        if self._left > 0:
            loop = asyncio.get_running_loop()
            # One timer on the batch's own future (``wait_for`` and ``shield`` add a task and a future per wait).
            timer = loop.call_later(max(self._t0 + timeout - loop.time(), 0.01), _expire, self._done)
            try:
                await self._done
            finally:
                timer.cancel()
        self.cancel()
        return self.errors

    def cancel(self) -> None:
        """Forget the acks still outstanding (they count as timed out; a late ack is ignored)."""
        waiting = self._owner._waiting  # noqa: SLF001
        for n in self._tokens:
            entry = waiting.pop(n, None)
            if entry is not None:
                self.errors[entry[1]] = TimeoutError("no JetStream ack in time")
        self._left = 0
        if not self._done.done():
            self._done.set_result(None)


def _expire(done: "asyncio.Future[None]") -> None:
    if not done.done():
        done.set_result(None)  # the acks still missing count as timed out (``InflightBatch.cancel``)


class AckPublisher:
    """Publishes to JetStream through ``nc`` with acks matched on one reply subscription (see the module doc).

    Example (inside a coroutine)::

        pub = await AckPublisher.open(nc)
        batch = await pub.start([(subject, payload, msg_id), ...])
        errors = await batch.settle(timeout=5.0)   # [None, None, ...] when all were stored
    """

    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self.prefix = ""
        self._next = 0
        self._waiting: dict[int, tuple[InflightBatch, int]] = {}
        self._sub: Any = None

    @classmethod
    async def open(cls, nc: Any) -> "AckPublisher":
        pub = cls(nc)
        pub.prefix = nc.new_inbox()
        # nats-py re-subscribes after a reconnect; acks for messages sent before it may never come (they time out).
        pub._sub = await nc.subscribe(pub.prefix + ".*", cb=pub._on_ack, pending_msgs_limit=-1,
                                      pending_bytes_limit=-1)
        return pub

    async def _on_ack(self, msg: Any) -> None:
        try:
            n = int(msg.subject[len(self.prefix) + 1:])
        except ValueError:
            return
        entry = self._waiting.pop(n, None)
        if entry is None:
            return  # late ack of a batch that already timed out
        batch, index = entry
        data = msg.data
        error: BaseException | None = None
        if not data and msg.headers and msg.headers.get("Status") == "503":
            error = NoRespondersError()
        elif b'"error"' in data:
            try:
                resp = json.loads(data)
                if "error" in resp:
                    error = APIError.from_error(resp["error"])
            except Exception as exc:  # noqa: BLE001 - an ack we cannot read is not an ack
                error = exc
        batch._acked(index, error)  # noqa: SLF001

    async def start(self, messages: Sequence[Message]) -> InflightBatch:
        """Publish ``messages`` (``Nats-Msg-Id`` = id, in order) without waiting for their acks."""
        batch = InflightBatch(self, messages)
        first = self._next
        self._next += len(messages)
        batch._tokens = range(first, self._next)  # noqa: SLF001
        publish, prefix, waiting = self.nc.publish, self.prefix, self._waiting
        for i, (subject, payload, msg_id) in enumerate(messages):
            n = first + i
            waiting[n] = (batch, i)
            try:
                await publish(subject, payload, reply=f"{prefix}.{n}", headers={"Nats-Msg-Id": msg_id})
            except Exception as exc:  # noqa: BLE001 - e.g. connection closed: the rest fail the same way
                for j in range(i, len(messages)):
                    waiting.pop(first + j, None)
                    batch._acked(j, exc)  # noqa: SLF001
                break
        return batch

    async def close(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # noqa: BLE001 - connection already gone
                pass
