"""The JetStream side: fetch from the forwarder's durables, decode, dead-letter poison, hand events to lanes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from pydantic import ValidationError

from kiln_contracts.service import dead_letter
from kiln_contracts import Event
from kiln_contracts.streams import Durable

from .metrics import ForwarderMetrics

log = logging.getLogger("kiln.clearml_forwarder")

Submit = Callable[[Msg, Event], Awaitable[None]]


class PullConsumer:
    """Fetches whatever arrived (up to ``batch``) and submits each event; acks are the lanes' business."""

    def __init__(self, nc: NATS, durable: Durable, submit: Submit, *, batch: int, fetch_ms: int,
                 metrics: ForwarderMetrics | None = None) -> None:
        self.nc, self.durable, self.submit, self.metrics = nc, durable, submit, metrics
        self.batch, self.fetch_s = batch, fetch_ms / 1000
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        js = self.nc.jetstream()
        name = self.durable.config.durable_name or ""
        await js.add_consumer(self.durable.stream, self.durable.config)
        psub = await js.pull_subscribe_bind(durable=name, stream=self.durable.stream)
        log.info("consuming %s/%s", self.durable.stream, name)
        try:
            await self._loop(psub, name)
        finally:
            with contextlib.suppress(Exception):
                await psub.unsubscribe()

    async def _loop(self, psub: Any, name: str) -> None:
        while not self._stop.is_set():
            try:
                msgs = await psub.fetch(self.batch, timeout=max(self.fetch_s, 0.05))
            except (TimeoutError, NatsTimeout):
                continue
            except Exception as exc:  # noqa: BLE001 - connection trouble: nats-py reconnects; wait a little
                log.warning("fetch failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            for m in msgs:
                if self._stop.is_set():  # shutting down: let it come back at once
                    await m.nak()
                    continue
                try:
                    ev = Event.model_validate_json(m.data)
                    wrong = ev.misaddressed(m.subject)  # another job's event on this job's subject: not mirrored
                    if wrong:
                        raise ValueError(wrong)
                except (ValidationError, ValueError) as exc:
                    await dead_letter(self.nc, name, m, f"invalid event: {str(exc)[:300]}")
                    if self.metrics is not None:
                        self.metrics.dead.labels(self.durable.stream).inc()
                    continue
                await self.submit(m, ev)
            if self.metrics is not None and msgs:
                self.metrics.received.labels(self.durable.stream).inc(len(msgs))
