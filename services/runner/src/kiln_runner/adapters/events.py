"""Publishes one job attempt's events from the runner: source "runner", one ``publisher`` id per attempt, ``seq``
gap-free across both streams and ``prev`` per stream (``Event.seq_key``), acked, msg id = event id."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from collections.abc import Callable

from kiln_sdk.spool import Spool
from nats.js import JetStreamContext

from kiln_contracts import Event, EventData, LogBatch, LogLine, StartJob
from kiln_contracts.retry import failure, retrying, steps

log = logging.getLogger("kiln.runner")
PUBLISH_TIMEOUT_S = 2.0
PUBLISH_ATTEMPTS = 3
PUBLISH_WAITS_S = (0.2, 0.5)  # a reconnect usually completes within these; then the event is spooled


class JobEvents:
    def __init__(self, js: JetStreamContext, cmd: StartJob, *, source: str = "runner", spool: Spool | None = None,
                 spooled: Callable[[], None] | None = None) -> None:
        self.js, self.cmd, self.source = js, cmd, source
        self.spool, self.spooled = spool, spooled
        self.publisher = secrets.token_hex(4)
        self.seq = 0
        self.last: dict[str, int] = {"events": 0, "logs": 0}  # seq of the last event put on each stream
        self.tail: deque[str] = deque(maxlen=30)
        self._lines: list[LogLine] = []
        self._lock = asyncio.Lock()
        self._emits: set[asyncio.Task[bool]] = set()

    async def emit(self, data: EventData) -> bool:
        """Publish (acked, msg id = event id); when NATS does not take it within a few seconds, spool it.

        Returns True when JetStream took it now, False when it was spooled (or given up).

        Once one event waits in the spool, the next ones queue behind it there (the order is kept) until the
        runner's :class:`~kiln_runner.adapters.spools.SpoolDrainer` has published them: nothing is dropped however
        long NATS is away, and the job never waits on the bus for more than those few seconds.

        An emit runs to its end even when its caller is cancelled (the heartbeat and log-flush loops are, when the
        trainer exits): an event that got its ``seq`` is published or spooled all the same, so a consumer never sees
        a gap where nothing was lost, nor the same lines twice under two numbers.
        """
        task = asyncio.ensure_future(self._emit(data))
        self._emits.add(task)
        task.add_done_callback(self._emits.discard)
        return await asyncio.shield(task)

    def _number(self, data: EventData) -> Event:
        self.seq += 1
        stream = "logs" if data.kind == "log" else "events"
        prev, self.last[stream] = self.last[stream], self.seq
        return Event.new(job_id=self.cmd.job_id, project=self.cmd.spec.project, attempt=self.cmd.attempt,
                         seq=self.seq, prev=prev, publisher=self.publisher, source=self.source, data=data)

    async def _emit(self, data: EventData) -> bool:
        async with self._lock:  # seq order == publish order
            ev = self._number(data)
            if self.spool is not None and self.spool.pending:
                self.spool.append([ev.to_bytes()])
                return False
            publish = retrying(steps(*PUBLISH_WAITS_S), attempts=PUBLISH_ATTEMPTS, after=lambda state: log.warning(
                "publish of %s failed (%s), retrying", ev.data.kind, failure(state)[0]))
            try:
                await publish(self.js.publish, ev.subject, ev.to_bytes(), headers=ev.headers(),
                              timeout=PUBLISH_TIMEOUT_S)
                return True
            except asyncio.CancelledError:  # the runner's loop is closing: the next runner process publishes it
                if self.spool is not None:
                    self.spool.append([ev.to_bytes()])
                raise
            except Exception:  # noqa: BLE001 - reconnecting, or away: retried (and logged) above, now spooled
                pass
            if self.spool is None:
                log.error("gave up publishing %s event of job %s", ev.data.kind, self.cmd.job_id)
                return False
            self.spool.append([ev.to_bytes()])
            log.warning("NATS unreachable: %s event of job %s spooled in %s", ev.data.kind, self.cmd.job_id,
                        self.spool.folder)
            if self.spooled is not None:
                self.spooled()
            return False

    def line(self, text: str, stream: str = "stdout") -> None:
        self.tail.append(text)
        self._lines.append(LogLine(stream=stream, text=text))  # type: ignore[arg-type]

    async def flush_logs(self) -> None:
        if self._lines:
            lines, self._lines = self._lines, []
            for i in range(0, len(lines), 500):
                try:
                    await self.emit(LogBatch(lines=lines[i : i + 500]))
                except BaseException:  # cancelled (the flush loop stops): that batch is still sent (see emit), the
                    self._lines = lines[i + 500 :] + self._lines  # final flush sends the rest
                    raise
