"""Composition root of the metrics-writer."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import nats

from kiln_contracts.natsauth import permissions
from kiln_contracts.service import run_until_signalled
from kiln_contracts.streams import Durable, writer_consumers
from kiln_observability import Observability, database, nats_connected, setup_logging
from kiln_store import make_engine, upgrade

from kiln_contracts.natsauth import client as identity
from .adapters.sql import write_batch
from .consumer import BatchConsumer
from .metrics import WriterMetrics
from .settings import Settings

log = logging.getLogger("kiln.metrics_writer")


async def run(settings: Settings, stop: asyncio.Event | None = None, obs: Observability | None = None) -> None:
    """Write until ``stop`` is set; ``obs`` holds its metrics and health (a fresh one by default)."""
    stop = stop or asyncio.Event()
    obs = obs or Observability()
    metrics = WriterMetrics(obs.registry)
    engine = make_engine(settings.database_url)
    await upgrade(engine)
    role = permissions.metrics_writer(settings.durable)
    inbox = identity.inbox_prefix(settings.nats_inbox_prefix, settings.nats_creds_file, role)
    nc = await nats.connect(identity.servers(settings.nats_url), max_reconnect_attempts=-1, name="kiln-metrics-writer",
                            **identity.connect_options(settings.nats_creds_file, inbox, settings.nats_tls))
    try:
        await identity.prepare_streams(nc.jetstream(), settings.nats_creds_file, role.streams, settings.streams_wait_s)
    except BaseException:
        await nc.close()
        await engine.dispose()
        raise

    async def write(events):  # type: ignore[no-untyped-def]
        return await write_batch(engine, events)

    lanes = settings.lanes if engine.dialect.name == "postgresql" else 1  # SQLite has one writer at a time
    durables = writer_consumers(settings.durable)
    if settings.ack_wait_s is not None:
        durables = tuple(Durable(d.stream, replace(d.config, ack_wait=settings.ack_wait_s)) for d in durables)
    consumers = [
        BatchConsumer(nc, d, write, batch_size=settings.batch_size, batch_ms=settings.batch_ms,
                      max_backoff_s=settings.max_backoff_s, lanes=lanes, metrics=metrics)
        for d in durables
    ]
    obs.health.add("nats", nats_connected(nc))
    obs.health.add("database", database(engine))
    obs.watch_jetstream(nc.jetstream(), sorted({d.stream for d in durables}),
                        [(d.stream, d.config.durable_name or "") for d in durables])
    await obs.start(settings.metrics_host, settings.metrics_port)
    tasks = [asyncio.create_task(c.run()) for c in consumers]
    log.info("metrics-writer running (db %s)", engine.url.render_as_string(hide_password=True))
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    obs.health.draining = True
    for c in consumers:
        c.stop()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for t in done:
        if t is not waiter and not t.cancelled() and t.exception():
            log.error("consumer crashed: %r", t.exception())
    await obs.stop()
    await nc.close()  # not drain: each consumer has already handed back what it held (negative acks)
    await engine.dispose()


def main() -> None:
    settings = Settings()
    setup_logging("metrics-writer", settings.log_level)
    run_until_signalled(lambda stop: run(settings, stop))


if __name__ == "__main__":
    main()
