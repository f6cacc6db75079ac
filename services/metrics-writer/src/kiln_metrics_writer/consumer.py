"""The JetStream side: fetch batches, decode, dead-letter poison, write, ack after commit."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from pydantic import ValidationError

from kiln_contracts import Event, subjects
from kiln_contracts.streams import Durable

log = logging.getLogger("kiln.metrics_writer")

WriteFn = Callable[[list[Event]], Awaitable[int]]


async def dead_letter(nc: NATS, consumer: str, msg: Msg, reason: str) -> None:
    """Terminate a poison message (no redelivery) and record it on the consumer's dead-letter subject."""
    seq = msg.metadata.sequence.stream if msg.reply else 0
    headers = {"Kiln-Reason": reason[:500], "Kiln-Stream-Seq": str(seq), "Kiln-Subject": msg.subject}
    await nc.jetstream().publish(subjects.dlq(consumer), msg.data, headers=headers)
    await msg.term()
    log.warning("dead-lettered stream seq %s on %s: %s", seq, msg.subject, reason)


class BatchConsumer:
    """Pulls up to ``batch_size`` messages or whatever arrived within ``batch_ms``, writes them, acks them."""

    def __init__(self, nc: NATS, durable: Durable, write: WriteFn, *, batch_size: int, batch_ms: int,
                 max_backoff_s: float = 10.0) -> None:
        self.nc, self.durable, self.write = nc, durable, write
        self.batch_size, self.batch_s, self.max_backoff_s = batch_size, batch_ms / 1000, max_backoff_s
        self.written = 0
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        js = self.nc.jetstream()
        name = self.durable.config.durable_name or ""
        await js.add_consumer(self.durable.stream, self.durable.config)
        psub = await js.pull_subscribe_bind(durable=name, stream=self.durable.stream)
        log.info("consuming %s/%s", self.durable.stream, name)
        while not self._stop.is_set():
            try:
                msgs = await psub.fetch(self.batch_size, timeout=max(self.batch_s, 0.05))
            except (NatsTimeout, asyncio.TimeoutError):
                continue
            except Exception as exc:  # connection trouble: nats-py reconnects; wait a little
                log.warning("fetch failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            await self._handle(name, msgs)

    async def _handle(self, name: str, msgs: list[Msg]) -> None:
        good: list[Msg] = []
        events: list[Event] = []
        for m in msgs:
            try:
                events.append(Event.model_validate_json(m.data))
                good.append(m)
            except (ValidationError, ValueError) as exc:
                await dead_letter(self.nc, name, m, f"invalid event: {str(exc)[:300]}")
        if not events:
            return
        delay = 0.2
        while True:
            try:
                t0 = time.perf_counter()
                n = await self.write(events)
                break
            except Exception as exc:  # database down or locked: keep the batch, back off, retry
                log.warning("write of %d events failed (%s); retrying in %.1fs", len(events), exc, delay)
                for m in good:  # keep them ours while we retry instead of letting them redeliver
                    try:
                        await m.in_progress()
                    except Exception:  # noqa: BLE001
                        pass
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
        for m in good:
            await m.ack()
        self.written += len(events)
        log.debug("wrote %d events (%d rows) in %.1f ms", len(events), n, (time.perf_counter() - t0) * 1000)
