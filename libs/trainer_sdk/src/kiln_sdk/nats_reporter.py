"""NatsReporter: JetStream publishing from a background thread, with a spool when NATS is unreachable.

The training thread only runs :meth:`NatsReporter.submit` (a ``deque.append`` plus, when the publisher sleeps, one
wake-up).  A daemon thread runs its own asyncio loop that serializes the events, publishes them pipelined with
``Nats-Msg-Id`` = event id and checks the acks batch by batch while later batches are already on the wire (a
bounded window of ``max_inflight`` messages), so serialization, the network and the server overlap.  Acks are matched
on one reply subscription (:mod:`kiln_sdk._acks`).  Whatever is not acknowledged goes to the spool file, in order;
once the spool holds anything, later events are appended behind it until it has been replayed, so the stream
receives events in ``seq`` order and the ids make every retry idempotent.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from kiln_contracts.natsauth.client import NatsTls, servers

from ._events import EventFactory, Record, start_thread, warn_once
from ._queue import Marker, RecordQueue
from .reporters import Reporter
from ._acks import AckPublisher, InflightBatch
from .spool import Message, Spool, auth_options, drain_spool


IDLE_POLL_S = 0.05
"""How often a publisher that recently had work looks at the queue: the most a metric waits before it is sent."""

IDLE_MAX_S = 2.0
"""The longer sleep (after a poll that found nothing, or after rare kinds only): any event ends it, so it only
bounds housekeeping."""


class NatsReporter(Reporter):
    """Publishes a run's events to JetStream without ever blocking the training thread for long.

    Args:
        nats_url: NATS server; ``None`` spools everything (the runner replays the spool).
        job_id: Job of the run.
        project: Project of the job.
        attempt: Attempt number (goes into every envelope).
        spool_dir: Folder of the spool (see :mod:`kiln_sdk.spool`); an existing spool is replayed first.
        maxsize: Queue size before metric updates are coalesced.
        batch: Events serialized and published per step.
        max_inflight: Published events whose acks may be outstanding at once (the pipelining window).
        ack_timeout: Seconds to wait for JetStream acks before spooling.
        autostart: Start the publisher thread now (tests start it later to fill the queue first).
        user_credentials: NATS ``.creds`` file of this attempt (``KILN_NATS_CREDS``); ``None``: no credentials.
        tls: NATS TLS files (CA, client certificate) the runner gave (``KILN_NATS_TLS_*``); ``None``: none.
        inbox_prefix: Inbox prefix for the acks (``KILN_NATS_INBOX_PREFIX``): the credentials allow no other.
            Once the credentials expire or are refused, the server closes the connection: what follows is
            spooled, and the runner replays the spool with its own identity.

    Example:
        >>> rep = NatsReporter(None, job_id="j1", spool_dir=__import__("tempfile").mkdtemp())
        >>> rep.submit(("metrics", 0.0, {"step": 1, "metrics": {"loss": 1.0}}))
        >>> rep.close(timeout=0.2), rep.stats["spooled"]   # no server: kept in the spool for the runner
        (False, 1)
    """

    def __init__(
        self,
        nats_url: str | None,
        job_id: str,
        project: str = "default",
        attempt: int = 1,
        spool_dir: str | Path = "spool",
        *,
        maxsize: int = 10_000,
        batch: int = 1000,
        max_inflight: int = 4000,
        ack_timeout: float = 5.0,
        autostart: bool = True,
        user_credentials: str | Path | None = None,
        inbox_prefix: str | None = None,
        tls: NatsTls | None = None,
    ) -> None:
        self.nats_url = nats_url
        self.auth = auth_options(user_credentials, inbox_prefix)
        self.tls = tls or NatsTls()
        self.factory = EventFactory(job_id, project, attempt)
        self.spool = Spool(Path(spool_dir))
        self.batch = batch
        self.max_inflight = max(max_inflight, batch)
        self._inflight: deque[InflightBatch] = deque()
        self._pub: AckPublisher | None = None
        self._inflight_n = 0
        self.ack_timeout = ack_timeout
        self.reconnect_grace = 3.0  # at close, how long to wait for a lost connection to come back
        self._q = RecordQueue(maxsize)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None  # resolved to end the publisher's current sleep
        self._woken = False  # a wake-up came while the publisher was awake: its next sleep returns at once
        self._idle = False
        self._deep_sleep = False  # sleeping longer than IDLE_POLL_S: every kind of event wakes it
        self._closed = False
        self._thread: threading.Thread | None = None
        self._nc: Any = None
        self._js: Any = None
        self._waiting: list[Marker] = []
        self._stop: Marker | None = None
        self._stop_seen = 0.0
        self._retry_at = 0.0
        self._backoff = 0.5
        self.delivered = 0
        self.spooled = 0
        if autostart:
            self.start()

    # -- training thread ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the publisher thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._thread_main, name="kiln-sdk-publisher", daemon=True)
            start_thread(self._thread)

    def submit(self, record: Record) -> None:
        if self._closed:
            return
        self._q.put(record)
        # Wake a sleeping publisher for the rare kinds only: a wake-up is a syscall on this thread, and metrics,
        # the frequent kind, are picked up by the publisher's poll within IDLE_POLL_S anyway; unless it sleeps
        # longer than that (after a poll that found nothing, or after events of the rare kinds only), when the
        # first event of any kind wakes it.
        if self._idle and (record[0] != "metrics" or self._deep_sleep):
            self._idle = False
            self._wake_up()

    def _wake_up(self) -> None:
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._wake_in_loop)
            except RuntimeError:  # loop already closed
                pass

    def _wake_in_loop(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        else:
            self._woken = True

    def _send_marker(self, marker: Marker, wait: float) -> bool:
        self._q.put(marker)
        self._wake_up()
        return marker.done.wait(wait)

    def flush(self, timeout: float = 10.0) -> bool:
        if self._closed or self._thread is None or not self._thread.is_alive():
            return not len(self._q) and not self.spool.pending
        marker = Marker()
        return self._send_marker(marker, timeout) and marker.ok

    def close(self, timeout: float = 10.0) -> bool:
        if self._closed:
            return not self.spool.pending
        self._closed = True
        if self._thread is None or not self._thread.is_alive():
            self._spool_leftovers()
            return False
        marker = Marker(stop=True, deadline=time.monotonic() + timeout)
        # Some slack beyond the deadline: the publisher needs it to spool what it could not deliver.
        if not self._send_marker(marker, timeout + 2.0):
            warn_once("close", "publisher did not stop in time; unsent events may be lost")
        return marker.ok

    def _spool_leftovers(self) -> None:
        # No publisher thread (never started, or died): keep the queued events for the runner's replay.
        items = self._q.drain(1 << 62)
        # Published but unconfirmed first (a copy already stored is de-duplicated on replay), then the queue.
        msgs = [m for batch in self._inflight for m in batch.messages]
        self._inflight.clear()
        self._inflight_n = 0
        msgs += self.factory.serialize_many([r for r in items if not isinstance(r, Marker)])
        try:
            self.spool.append([payload for _, payload, _ in msgs])
            self.spooled += len(msgs)
        finally:
            self.spool.close()
            for marker in items:
                if isinstance(marker, Marker):
                    marker.done.set()  # nobody else will answer it

    @property
    def stats(self) -> dict[str, Any]:
        return {
            "delivered": self.delivered, "spooled": self.spooled, "coalesced": self._q.coalesced_total,
            "queued": len(self._q), "spool_pending": self.spool.pending, "connected": self._connected(),
        }

    # -- publisher thread -----------------------------------------------------------------------------------

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # noqa: BLE001 - report, then keep what is queued on disk
            warn_once("publisher", f"publisher stopped: {exc!r}")
            self._spool_leftovers()
        finally:
            if self._stop is not None:
                self._stop.done.set()
            loop.close()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        connector = asyncio.ensure_future(self._connect()) if self.nats_url else None
        if connector is not None:
            try:  # give the first connection a moment, so a healthy run never spools its first events
                await asyncio.wait_for(asyncio.shield(connector), 2.0)
            except Exception:  # noqa: BLE001 - keeps trying in the background
                pass
        try:
            await self._pump()
        finally:
            if connector is not None:
                connector.cancel()
            if self._nc is not None:
                try:
                    await asyncio.wait_for(self._nc.close(), 2.0)
                except Exception:  # noqa: BLE001
                    pass

    async def _connect(self) -> None:
        import nats

        async def on_error(exc: Exception) -> None:
            warn_once("nats", f"NATS {self.nats_url}: {exc!r}; events go to {self.spool.path} until it is back")

        async def on_change() -> None:
            self._retry_at = 0.0
            self._wake_in_loop()

        try:
            # max_reconnect_attempts=-1 also retries the first connection forever, in this background task.
            context = self.tls.context()
            nc = await nats.connect(
                servers(self.nats_url or ""), name=f"kiln-sdk-{self.factory.job_id}", allow_reconnect=True,
                max_reconnect_attempts=-1, reconnect_time_wait=0.5, connect_timeout=2, error_cb=on_error,
                disconnected_cb=on_change, reconnected_cb=on_change, **self.auth,
                **({"tls": context} if context is not None else {}),
            )
        except Exception as exc:  # noqa: BLE001 - e.g. a malformed URL: spool only, the runner replays
            warn_once("connect", f"cannot connect to NATS {self.nats_url}: {exc!r}; spooling to {self.spool.path}")
            return
        try:
            self._pub = await AckPublisher.open(nc)
        except Exception as exc:  # noqa: BLE001 - connected, but not for long: the reconnect logic takes over
            warn_once("subscribe", f"cannot subscribe to acks: {exc!r}; spooling to {self.spool.path}")
            await nc.close()
            return
        self._nc, self._js = nc, nc.jetstream(timeout=self.ack_timeout)
        await on_change()

    def _connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def _pump(self) -> None:
        idle = IDLE_POLL_S
        while True:
            items = self._q.drain(self.batch)
            try:
                if items:
                    await self._handle(items)
                if self.spool.pending and self._connected() and time.monotonic() >= self._retry_at:
                    await self._replay()
            except Exception as exc:  # noqa: BLE001 - e.g. disk full: say it once, keep the loop alive
                warn_once(f"pump:{type(exc).__name__}", f"publisher error: {exc!r}")
            if not self.spool.pending:
                for marker in self._waiting:
                    marker.ok = True
                    marker.done.set()
                self._waiting.clear()
            if self._stop is not None and not len(self._q) and not self._keep_trying():
                break
            if not items:
                if self._inflight:
                    await self._settle_all()
                    continue
                # After work, one short poll (metrics do not wake it, so a stream of them costs the training
                # thread no syscall); when that finds nothing, a long sleep that any event ends (polling 20 times
                # a second cost about 0.6% of a core).  While the spool waits for NATS it keeps the short poll.
                await self._sleep(idle)
                idle = IDLE_POLL_S if self.spool.pending or self._stop is not None else IDLE_MAX_S
            else:
                # Metrics tend to come in streams: look again shortly, without having them wake the publisher.
                # Other kinds are one-offs (progress at most 4 times a second): sleep until the next one.
                idle = IDLE_POLL_S if self.spool.pending or any(
                    type(r) is tuple and r[0] == "metrics" for r in items) else IDLE_MAX_S
        self._stop_now()

    async def _sleep(self, timeout: float) -> None:
        # A bare future and one timer (``asyncio.wait_for`` adds a task per sleep: a third of the idle cost).
        loop = self._loop
        assert loop is not None
        self._deep_sleep = timeout > IDLE_POLL_S
        self._idle = True
        if not len(self._q) and not self._woken:  # re-check after raising the flag: submit() may have missed it
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(timeout, _resolve, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        self._idle = self._deep_sleep = self._woken = False

    def _keep_trying(self) -> bool:
        now = time.monotonic()
        assert self._stop is not None
        if not self.spool.pending or now >= self._stop.deadline or not self.nats_url:
            return False
        return self._connected() or now < self._stop_seen + self.reconnect_grace

    def _stop_now(self) -> None:
        assert self._stop is not None
        self.spool.close()
        self._stop.ok = not self.spool.pending and not len(self._q)
        if self.spool.pending:
            warn_once("left", f"{self.spool.size - self.spool.offset} bytes of events left in {self.spool.path} "
                              "(kiln_sdk.spool.replay publishes them)")
        for marker in self._waiting:
            marker.done.set()
        self._stop.done.set()

    async def _handle(self, items: list[Record | Marker]) -> None:
        segment: list[Record] = []
        for item in items:
            if isinstance(item, Marker):
                await self._deliver(segment)
                await self._settle_all()  # a marker is answered once everything before it is acknowledged
                segment = []
                if item.stop:
                    self._stop, self._stop_seen = item, time.monotonic()
                else:
                    self._waiting.append(item)
            else:
                segment.append(item)
        await self._deliver(segment)

    def _ack_timeout(self) -> float:
        if self._stop is None:
            return self.ack_timeout
        return min(self.ack_timeout, max(0.05, self._stop.deadline - time.monotonic()))

    async def _deliver(self, records: list[Record]) -> None:
        if not records:
            return
        msgs: list[Message] = self.factory.serialize_many(records)
        if self.spool.pending or not self._connected():
            await self._settle_all()  # what is in flight may fail: it must reach the spool before these
            self._to_spool(msgs)  # behind what is already spooled: order is kept
            return
        while self._inflight and self._inflight_n + len(msgs) > self.max_inflight:
            await self._settle_oldest()
        if self.spool.pending:  # the window failed meanwhile: keep the order behind it
            self._to_spool(msgs)
            return
        assert self._pub is not None
        self._inflight.append(await self._pub.start(msgs))
        self._inflight_n += len(msgs)

    async def _settle_all(self) -> None:
        while self._inflight:
            await self._settle_oldest()

    async def _settle_oldest(self) -> None:
        """Check the acks of the oldest batch in flight; on a failure spool it and everything published after it."""
        batch = self._inflight.popleft()
        self._inflight_n -= len(batch.messages)
        errors = await batch.settle(self._ack_timeout())
        bad = next((i for i, err in enumerate(errors) if err is not None), None)
        if bad is None:
            self.delivered += len(errors)
            return
        warn_once(f"publish:{type(errors[bad]).__name__}", f"publish failed ({errors[bad]!r}); spooling and retrying")
        self.delivered += bad
        # A later one that was stored anyway is de-duplicated on replay by its id.
        self._to_spool(list(batch.messages[bad:]))
        while self._inflight:
            later = self._inflight.popleft()
            later.cancel()
            self._to_spool(list(later.messages))
        self._inflight_n = 0
        self._retry_at = time.monotonic() + self._backoff

    def _to_spool(self, msgs: list[Message]) -> None:
        self.spool.append([payload for _, payload, _ in msgs])
        self.spooled += len(msgs)

    async def _replay(self) -> None:
        # Not a retry loop (and so not kiln_contracts.retry): the pump must go on taking the training thread's
        # events (spooling them behind) and answering flush/close markers while the spool waits, so a failed replay
        # only sets the time of the next one (0.5 s doubling to 5 s, back to 0.5 s once one goes through) and the
        # pump tries again when it comes by after that.
        published, failed = await drain_spool(self._js, self.spool, timeout=self._ack_timeout(), max_chunks=5)
        self.delivered += published
        if failed:
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, 5.0)
        else:
            self._backoff = 0.5


def _resolve(waiter: "asyncio.Future[None]") -> None:
    if not waiter.done():
        waiter.set_result(None)
