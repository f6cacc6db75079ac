"""Publishes one job attempt's events from the runner (source "runner", gap-free seq, acked, msg id = event id)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from kiln_sdk.spool import Spool
from nats.js import JetStreamContext

from kiln_contracts import Event, EventData, LogBatch, LogLine, StartJob

log = logging.getLogger("kiln.runner")
PUBLISH_TIMEOUT_S = 2.0
PUBLISH_RETRIES_S = (0.2, 0.5, 1.0)  # a reconnect usually completes within these; then the event is spooled


class JobEvents:
    def __init__(self, js: JetStreamContext, cmd: StartJob, *, source: str = "runner", spool: Spool | None = None,
                 spooled: Callable[[], None] | None = None) -> None:
        self.js, self.cmd, self.source = js, cmd, source
        self.spool, self.spooled = spool, spooled
        self.seq = 0
        self.tail: deque[str] = deque(maxlen=30)
        self._lines: list[LogLine] = []
        self._lock = asyncio.Lock()

    async def emit(self, data: EventData) -> bool:
        """Publish (acked, msg id = event id); when NATS does not take it within a few seconds, spool it.

        Returns True when JetStream took it now, False when it was spooled (or given up).

        Once one event waits in the spool, the next ones queue behind it there (the order is kept) until the
        runner's :class:`~kiln_runner.adapters.spools.SpoolDrainer` has published them: nothing is dropped however
        long NATS is away, and the job never waits on the bus for more than those few seconds.
        """
        async with self._lock:  # seq order == publish order
            self.seq += 1
            ev = Event.new(job_id=self.cmd.job_id, project=self.cmd.spec.project, attempt=self.cmd.attempt,
                           seq=self.seq, source=self.source, data=data)
            if self.spool is not None and self.spool.pending:
                self.spool.append([ev.to_bytes()])
                return False
            for delay in PUBLISH_RETRIES_S:
                try:
                    await self.js.publish(ev.subject, ev.to_bytes(), headers=ev.headers(), timeout=PUBLISH_TIMEOUT_S)
                    return True
                except Exception as exc:  # noqa: BLE001 - reconnecting, or away: retried, then spooled
                    log.warning("publish of %s failed (%s), retrying", ev.data.kind, exc)
                    await asyncio.sleep(delay)
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
                except BaseException:  # cancelled mid-way (the flush loop stops): the final flush sends them
                    self._lines = lines[i:] + self._lines
                    raise
