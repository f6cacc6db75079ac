"""The JetStream side: pull, decode as messages arrive, dead-letter poison, write a batch, ack after its commit.

Every held message (buffered or being written) is kept the writer's own with in-progress acks once it has been held
for a while, so the durable's ack wait can be short: it is then only how long a dead writer's messages wait before
JetStream hands them to another writer.  A writer that stops cleanly hands them back at once (negative acks).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from itertools import chain
from typing import Union

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from sqlalchemy import exc as sa_exc

from kiln_contracts.retry import RetryCallState, backoff, failure, retrying, unless
from kiln_contracts.service import dead_letter
from kiln_contracts.streams import Durable

from .decode import Decoded, Poison, decode
from .domain import count_points
from .metrics import WriterMetrics

log = logging.getLogger("kiln.metrics_writer")

WriteFn = Callable[[list[Decoded]], Awaitable[int]]


class Item:
    """A delivered message, decoded, and when JetStream's ack timer last started for it (delivery, in-progress)."""

    __slots__ = ("data", "msg", "touched")

    def __init__(self, msg: Msg, data: Union[Decoded, Poison], touched: float) -> None:
        self.msg, self.data, self.touched = msg, data, touched


def is_data_error(exc: BaseException) -> bool:
    """Whether the database refused the data itself (SQLSTATE class 22 or 23), as opposed to being unreachable."""
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            return False
        if isinstance(seen, (sa_exc.DataError, sa_exc.IntegrityError)) or type(seen).__name__ == "DataError":
            return True
        state = getattr(seen, "sqlstate", None)
        if isinstance(state, str) and state[:2] in ("22", "23"):
            return True
        seen = getattr(seen, "orig", None) or seen.__cause__
    return False


class Puller:
    """Keeps one pull request open on a durable consumer and buffers the messages it delivers, decoded.

    nats-py's ``fetch`` spends a task and a timer on every message (it tops out near 25,000-30,000 msgs/s on this
    kind of machine); here a subscription callback decodes each message into a deque, and the next pull request goes
    out as soon as the previous one is served, so fetching and decoding overlap the database's work on the previous
    batch.  At most ``max_held`` messages are held (buffered or being written): keep it under max_ack_pending.
    """

    def __init__(self, nc: NATS, stream: str, durable: str, *, batch: int, max_held: int,
                 expires_s: float = 2.0) -> None:
        self.nc, self.batch, self.max_held, self.expires_s = nc, batch, max(max_held, batch), expires_s
        self.api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.items: deque[Item] = deque()
        self.in_write = 0
        self._left = 0
        self._status: str | None = None
        self._arrived, self._room, self._served = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def held(self) -> int:
        return len(self.items) + self.in_write

    async def start(self) -> None:
        self.inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(self.inbox, cb=self._on_msg)
        self._task = asyncio.create_task(self._pull_loop())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self._sub.unsubscribe()
        except Exception:  # noqa: BLE001 - connection already closed
            pass

    async def _on_msg(self, msg: Msg) -> None:
        if not msg.reply:  # a status about our pull request: 404/408 when it ends, 100 heartbeat, 409 trouble
            status = (msg.headers or {}).get("Status")
            if status != "100":
                self._status = status
                self._served.set()
            return
        try:
            item: Decoded | Poison = decode(msg.subject, msg.data)
        except Poison as exc:
            item = exc
        self.items.append(Item(msg, item, time.monotonic()))
        self._arrived.set()
        self._left -= 1
        if self._left <= 0:
            self._served.set()

    async def _pull_loop(self) -> None:
        body = json.dumps({"batch": self.batch, "expires": int(self.expires_s * 1e9)}).encode()
        while True:
            while self.held > self.max_held - self.batch:
                self._room.clear()
                await self._room.wait()
            self._left, self._status = self.batch, None
            self._served.clear()
            try:
                await self.nc.publish(self.api, body, reply=self.inbox)
                await asyncio.wait_for(self._served.wait(), self.expires_s + 1.0)
            except asyncio.TimeoutError:
                continue  # the request was lost (e.g. across a reconnect): ask again
            except Exception as exc:  # noqa: BLE001 - connection trouble: nats-py reconnects
                log.warning("pull request failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            if self._status not in (None, "404", "408"):
                log.warning("pull request on %s ended with status %s", self.api, self._status)
                await asyncio.sleep(0.5)

    async def take(self, max_n: int, linger_s: float) -> list[Item]:
        """Up to ``max_n`` buffered messages, waiting for the first one, then up to ``linger_s`` for a fuller batch."""
        while not self.items:
            self._arrived.clear()
            await self._arrived.wait()
        if len(self.items) < max_n and linger_s > 0:
            await asyncio.sleep(linger_s)
        n = min(max_n, len(self.items))
        self.in_write += n
        return [self.items.popleft() for _ in range(n)]

    def release(self, n: int) -> None:
        self.in_write -= n
        self._room.set()


class BatchConsumer:
    """Writes what one durable consumer delivers, ``batch_size`` messages at most per transaction, acking after it.

    Batches form naturally: while one is being written, the next accumulates (``batch_ms`` is only a short wait for
    more when the buffer holds less than a batch).  Database errors are retried with backoff; an event the database
    refuses as data is found by halving the batch and is dead-lettered alone.  Meanwhile :meth:`_keep_alive` sends
    in-progress acks for whatever has been held for ``KEEP_AFTER`` of the ack wait, so a slow commit or an outage
    never makes JetStream redeliver what this writer still holds.
    """

    KEEP_AFTER = 0.4  # of the ack wait: a held message older than this gets an in-progress ack...
    KEEP_EVERY = 0.1  # ...checked this often: at worst half the ack wait passes between two of them

    def __init__(self, nc: NATS, durable: Durable, write: WriteFn, *, batch_size: int, batch_ms: int,
                 max_backoff_s: float = 10.0, lanes: int = 1, max_held: int | None = None,
                 metrics: WriterMetrics | None = None) -> None:
        self.nc, self.durable, self.write, self.metrics = nc, durable, write, metrics
        self.batch_size, self.batch_s, self.max_backoff_s = batch_size, batch_ms / 1000, max_backoff_s
        self.lanes = max(1, lanes)
        cap = durable.config.max_ack_pending or 0
        want = (self.lanes + 2) * batch_size
        self.max_held = max_held or (min(want, cap) if cap > 0 else want)
        self.ack_wait = float(durable.config.ack_wait or 30.0)  # JetStream's default when none is set
        self.written = 0
        self.kept = 0  # in-progress acks sent
        self._stop = asyncio.Event()
        self._writing: dict[int, list[Item]] = {}  # lane -> the batch it is writing

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        js = self.nc.jetstream()
        name = self.durable.config.durable_name or ""
        await js.add_consumer(self.durable.stream, self.durable.config)
        puller = Puller(self.nc, self.durable.stream, name, batch=self.batch_size, max_held=self.max_held)
        await puller.start()
        log.info("consuming %s/%s (%d lane(s), ack wait %gs)", self.durable.stream, name, self.lanes, self.ack_wait)
        tasks = [asyncio.create_task(self._lane(i, name, puller)) for i in range(self.lanes)]
        tasks.append(asyncio.create_task(self._keep_alive(puller)))
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await puller.close()  # first: JetStream delivers nothing to a pull request nobody listens to any more
            await self._give_back(puller)
            log.info("%s: %d events written, %d in-progress acks sent", name, self.written, self.kept)

    def _held(self, puller: Puller) -> Iterator[Item]:
        return chain(puller.items, *self._writing.values())

    async def _keep_alive(self, puller: Puller) -> None:
        """In-progress acks for every message held for a while, so JetStream restarts its ack timer instead of
        redelivering (to this writer or another) what this writer is still about to commit."""
        stale, every = self.KEEP_AFTER * self.ack_wait, self.KEEP_EVERY * self.ack_wait
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            try:
                for it in [it for it in self._held(puller) if now - it.touched > stale]:
                    await self.nc.publish(it.msg.reply, b"+WPI")
                    it.touched = now
                    self.kept += 1
            except Exception as exc:  # noqa: BLE001 - disconnected: the rest is tried again at the next round
                log.debug("in-progress acks interrupted: %s", exc)

    async def _give_back(self, puller: Puller) -> None:
        """On a clean stop: negative acks for everything still held, so another writer gets it now rather than after
        the ack wait.  A batch whose commit went through but whose acks did not is written again: a no-op."""
        try:
            await self.nc.flush(timeout=2)  # the unsubscription of the pull inbox is through
            for it in self._held(puller):
                if not it.msg.is_acked:
                    await self.nc.publish(it.msg.reply, b"-NAK")
            await self.nc.flush(timeout=2)
        except Exception:  # noqa: BLE001 - connection gone: the ack wait brings them back instead
            pass

    async def _lane(self, lane: int, name: str, puller: Puller) -> None:
        """One write at a time; with several lanes the database works on several batches at once."""
        while not self._stop.is_set():
            items = await puller.take(self.batch_size, self.batch_s)
            self._writing[lane] = items
            await self._handle(name, items)  # if stopped (cancelled) or failed, the batch stays for _give_back
            del self._writing[lane]
            puller.release(len(items))

    async def _handle(self, name: str, items: list[Item]) -> None:
        msgs: list[Msg] = []
        decoded: list[Decoded] = []
        for it in items:
            if isinstance(it.data, Poison):
                await dead_letter(self.nc, name, it.msg, str(it.data))
                if self.metrics is not None:
                    self.metrics.dead.labels(self.durable.stream).inc()
            else:
                msgs.append(it.msg)
                decoded.append(it.data)
        if not decoded:
            return
        t0 = time.perf_counter()
        for m in await self._write(name, msgs, decoded):
            await m.ack()
        self.written += len(decoded)
        log.debug("wrote %d events in %.1f ms", len(decoded), (time.perf_counter() - t0) * 1000)

    async def _write(self, name: str, msgs: list[Msg], decoded: list[Decoded]) -> list[Msg]:
        """Write, retrying while the database is unreachable; returns the messages to ack.

        Retried with backoff (0.2 s doubling to ``max_backoff_s``) for as long as it takes (meanwhile
        :meth:`_keep_alive` keeps the held messages ours); never retried: data the database refuses, found by
        halving the batch and dead-lettered alone.  The retry costs a few microseconds per batch, not per event
        (docs/performance.md#metrics-writer).
        """
        def failed(state: RetryCallState) -> None:
            exc, _, wait = failure(state)
            log.warning("write of %d events failed (%s); retrying in %.1fs", len(decoded), exc, wait)
            if self.metrics is not None:
                self.metrics.retries.labels(self.durable.stream).inc()

        try:
            async for attempt in retrying(backoff(0.2, self.max_backoff_s), retry=unless(is_data_error),
                                          before_sleep=failed):
                with attempt:
                    t0 = time.perf_counter()  # the commit's own time: the attempt that went through
                    await self.write(decoded)
        except Exception as exc:  # refused as data: every other error is retried above
            if len(decoded) == 1:
                await dead_letter(self.nc, name, msgs[0], f"refused by the database: {str(exc)[:300]}")
                if self.metrics is not None:
                    self.metrics.dead.labels(self.durable.stream).inc()
                return []
            half = len(decoded) // 2
            return [*await self._write(name, msgs[:half], decoded[:half]),
                    *await self._write(name, msgs[half:], decoded[half:])]
        if self.metrics is not None:  # per batch: nothing per event on the hot path but counting points
            self.metrics.committed(self.durable.stream, len(decoded), count_points(decoded), time.perf_counter() - t0)
        return msgs
