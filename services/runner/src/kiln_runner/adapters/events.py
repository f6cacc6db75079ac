"""Publishes one job attempt's events from the runner (source "runner", gap-free seq, acked, msg id = event id)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from nats.js import JetStreamContext

from kiln_contracts import Event, LogBatch, LogLine, StartJob
from kiln_contracts.events import _Payload

log = logging.getLogger("kiln.runner")


class JobEvents:
    def __init__(self, js: JetStreamContext, cmd: StartJob, *, source: str = "runner") -> None:
        self.js, self.cmd, self.source = js, cmd, source
        self.seq = 0
        self.tail: deque[str] = deque(maxlen=30)
        self._lines: list[LogLine] = []
        self._lock = asyncio.Lock()

    async def emit(self, data: _Payload) -> None:
        """Publish with retries: the bus may be briefly away (reconnecting); the msg id makes retries safe."""
        async with self._lock:  # seq order == publish order
            self.seq += 1
            ev = Event.new(job_id=self.cmd.job_id, project=self.cmd.spec.project, attempt=self.cmd.attempt,
                           seq=self.seq, source=self.source, data=data)
            delay = 0.2
            for _ in range(60):
                try:
                    await self.js.publish(ev.subject, ev.to_bytes(), headers=ev.headers(), timeout=5)
                    return
                except Exception as exc:  # noqa: BLE001
                    log.warning("publish of %s failed (%s), retrying", ev.data.kind, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
            log.error("gave up publishing %s event of job %s", ev.data.kind, self.cmd.job_id)

    def line(self, text: str, stream: str = "stdout") -> None:
        self.tail.append(text)
        self._lines.append(LogLine(stream=stream, text=text))  # type: ignore[arg-type]

    async def flush_logs(self) -> None:
        if self._lines:
            lines, self._lines = self._lines, []
            for i in range(0, len(lines), 500):
                await self.emit(LogBatch(lines=lines[i : i + 500]))
