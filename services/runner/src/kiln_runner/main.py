"""Composition root of a runner: FastStream broker, durable pull consumer of the pool, cancel listener."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from faststream.nats import JStream, NatsBroker, NatsCredentials, NatsMessage, NatsSecurity, PullSub
from faststream.middlewares import AckPolicy

from kiln_contracts.natsauth import jsapi, permissions
from kiln_contracts.service import run_until_signalled
from kiln_contracts import streams, subjects

from kiln_contracts.natsauth import client as identity
from kiln_observability import Observability, nats_connected, setup_logging

from .adapters import trainer_creds
from .handlers import Runner
from .metrics import RunnerMetrics
from .reaper import Reaper, open_buckets
from .settings import Settings

log = logging.getLogger("kiln.runner")


async def _raw(msg):  # type: ignore[no-untyped-def]
    return msg.body  # the handler validates itself, so that a bad command is dead-lettered, not retried


async def run(settings: Settings, stop: asyncio.Event, obs: Observability | None = None) -> None:
    obs = obs or Observability()
    metrics = RunnerMetrics(obs.registry, settings.pool)
    consuming = asyncio.Event()  # ready once the pull consumer runs, until the drain starts
    cancels_missed = asyncio.Event()

    runner: Runner | None = None

    async def reconnected() -> None:  # a cancel message sent while we were away is lost: read the marks again
        cancels_missed.set()
        if runner is not None:
            runner.spools.wake()  # and publish what was spooled meanwhile

    role = permissions.runner(settings.pool)
    inbox = identity.inbox_prefix(settings.nats_inbox_prefix, settings.nats_creds_file, role)
    own: dict[str, Any] = {"inbox_prefix": inbox} if inbox else {}  # its own identity, when configured
    tls = settings.nats_tls.context()  # FastStream takes TLS through its security object, with the creds
    if settings.nats_creds_file is not None:
        own["security"] = NatsCredentials(str(settings.nats_creds_file), ssl_context=tls)
    elif tls is not None:
        own["security"] = NatsSecurity(ssl_context=tls)
    broker = NatsBroker(identity.servers(settings.nats_url), max_reconnect_attempts=-1,
                        name=f"kiln-runner-{settings.runner_id}",
                        reconnected_cb=reconnected, logger=logging.getLogger("kiln.runner.broker"), **own)
    nc = await broker.connect()
    js = nc.jetstream()
    obs.health.add("nats", nats_connected(nc))
    obs.health.add("consuming", consuming.is_set)
    jobs_stream, durable = streams.JOBS.name or "", streams.runner_consumer(settings.pool).durable_name or ""
    obs.watch_jetstream(js, [jobs_stream], [(jobs_stream, durable)])
    await obs.start(settings.metrics_host, settings.metrics_port)  # alive while it waits for the streams
    buckets = (streams.CLAIMS_BUCKET, streams.RUNNING_BUCKET, streams.LEASES_BUCKET)
    await identity.prepare_streams(js, settings.nats_creds_file, (*role.streams, *map(jsapi.kv_stream, buckets)),
                                   settings.streams_wait_s)
    consumer = streams.runner_consumer(settings.pool, max_ack_pending=1000, ack_wait=settings.ack_wait_s)
    await js.add_consumer(streams.JOBS.name or "", consumer)
    registry, leases = await open_buckets(js)
    runner = Runner(settings, nc, await js.key_value(streams.CLAIMS_BUCKET), registry, recheck=cancels_missed,
                    metrics=metrics)
    metrics.runner = runner
    reaper_stop = asyncio.Event()  # also ends the cancel watch: both run until the running jobs are drained
    reaper = Reaper(js, registry, leases, settings.runner_id, lost_after_s=settings.lost_after_s,
                    lease_s=settings.reaper_lease_s, metrics=metrics)
    reaper_task = asyncio.create_task(reaper.run(reaper_stop)) if settings.reaper else None
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    if left := trainer_creds.sweep(settings.work_dir / "jobs"):
        log.info("deleted %d trainer creds file(s) an earlier runner process left", left)
    if settings.nats_creds_file is not None and runner.trainer_creds is None:
        log.warning("the runner has its own NATS identity but no trainer signing key: trainers connect without "
                    "credentials (set KILN_RUNNER_TRAINER_SIGNING_SEED_FILE and KILN_RUNNER_NATS_ACCOUNT)")
    # FastStream's pull subscriber does not take the connection's inbox prefix: it is given its own.
    sub_inbox = {"inbox_prefix": f"{inbox}.".encode()} if inbox else {}

    @broker.subscriber(
        subjects.start(settings.pool),
        stream=JStream(streams.JOBS.name or "", declare=False),
        durable=consumer.durable_name,
        pull_sub=PullSub(batch_size=1, timeout=1.0),
        ack_policy=AckPolicy.MANUAL,
        decoder=_raw,
        title=f"runner-{settings.pool}",
        description="Claims StartJob commands of this pool and runs the trainer.",
        **sub_inbox,
    )
    async def on_start(msg: NatsMessage) -> None:
        await runner.on_start(msg)

    cancel_sub = await nc.subscribe(subjects.CANCEL_ALL, cb=runner.on_cancel)
    cancel_watch = asyncio.create_task(runner.watch_cancels(reaper_stop))
    spools_stop = asyncio.Event()
    spool_task = asyncio.create_task(runner.spools.run(spools_stop))
    await broker.start()
    consuming.set()
    log.info("runner %s up: pool %s, %d slot(s)", settings.runner_id, settings.pool, settings.slots)
    await stop.wait()
    obs.health.draining = True
    log.info("runner %s shutting down: no new work; %d job(s) running", settings.runner_id, len(runner.jobs))
    runner.stop_taking_work()
    for sub in broker.subscribers:
        await sub.stop()
    await runner.drain(settings.shutdown_grace_s)
    reaper_stop.set()
    if reaper_task:
        await reaper_task
    cancel_watch.cancel()
    spools_stop.set()
    await spool_task
    if runner.spools.pending:
        log.warning("%d spool(s) not published yet: the next runner on this work folder publishes them",
                    runner.spools.pending)
    await cancel_sub.unsubscribe()
    await broker.stop()
    await obs.stop()


def main() -> None:
    settings = Settings()
    setup_logging("runner", settings.log_level)
    run_until_signalled(lambda stop: run(settings, stop))


if __name__ == "__main__":
    main()
