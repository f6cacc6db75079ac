"""Composition root of the ClearML forwarder."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import nats

from kiln_contracts.natsauth import jsapi, permissions
from kiln_contracts.service import run_until_signalled
from kiln_contracts.streams import forwarder_consumers

from kiln_contracts.natsauth import client as identity
from kiln_observability import Observability, nats_connected, setup_logging

from .adapters.clearml import ClearMLPort, make_clearml
from .adapters.task_map import TaskMap
from .consumer import PullConsumer
from .handlers import Blocking, Deps
from .lanes import Dispatcher, Timing
from .metrics import ForwarderMetrics
from .settings import Settings

log = logging.getLogger("kiln.clearml_forwarder")


def build_clearml(settings: Settings) -> ClearMLPort:
    if settings.cache_dir and not os.environ.get("CLEARML_CACHE_DIR"):
        os.environ["CLEARML_CACHE_DIR"] = str(settings.cache_dir)
    return make_clearml(settings.offline, settings.config_file, settings.output_uri, settings.call_timeout_s)


async def run(settings: Settings, stop: asyncio.Event | None = None, clearml: ClearMLPort | None = None,
              obs: Observability | None = None) -> None:
    """Forward until ``stop`` is set; ``clearml`` replaces the adapter built from the settings (tests); ``obs``
    holds its metrics and health (a fresh one by default)."""
    if not settings.enabled:
        log.info("clearml-forwarder disabled (set KILN_CLEARML_ENABLED=1 to run it)")
        return
    stop = stop or asyncio.Event()
    role = permissions.clearml_forwarder(settings.durable, settings.task_map_bucket)
    inbox = identity.inbox_prefix(settings.nats_inbox_prefix, settings.nats_creds_file, role)
    nc = await nats.connect(identity.servers(settings.nats_url), max_reconnect_attempts=-1,
                            name="kiln-clearml-forwarder",
                            **identity.connect_options(settings.nats_creds_file, inbox, settings.nats_tls))
    js = nc.jetstream()
    try:  # with creds the task map bucket is the provisioner's to create, too
        await identity.prepare_streams(js, settings.nats_creds_file,
                                       (*role.streams, jsapi.kv_stream(settings.task_map_bucket)),
                                       settings.streams_wait_s)
    except BaseException:
        await nc.close()
        raise
    blocking = Blocking(clearml or build_clearml(settings), settings.workers, settings.keepalive_s)
    deps = Deps(blocking, await TaskMap.open(js, settings.task_map_bucket), list(settings.tags),
                settings.project_prefix)
    timing = Timing(backoff_initial_s=settings.backoff_initial_s, max_backoff_s=settings.max_backoff_s,
                    keepalive_s=settings.keepalive_s, linger_s=settings.linger_s, idle_s=settings.idle_s,
                    forget_s=settings.forget_s)
    obs = obs or Observability()
    metrics = ForwarderMetrics(obs.registry)
    dispatcher = Dispatcher(deps, timing, metrics)
    durables = forwarder_consumers(settings.durable)
    consumers = [PullConsumer(nc, d, dispatcher.submit, batch=settings.fetch_batch, fetch_ms=settings.fetch_ms,
                              metrics=metrics) for d in durables]
    obs.health.add("nats", nats_connected(nc))
    obs.watch_jetstream(js, [], [(d.stream, d.config.durable_name or "") for d in durables])
    await obs.start(settings.metrics_host, settings.metrics_port)
    tasks: list[asyncio.Task[Any]] = [asyncio.create_task(c.run()) for c in consumers]
    log.info("clearml-forwarder running (%s)", "offline mode" if settings.offline else "ClearML server")
    waiter: asyncio.Task[Any] = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    obs.health.draining = True
    for c in consumers:
        c.stop()
    await asyncio.wait(tasks, timeout=2.0)
    for t in tasks:
        t.cancel()
    for t in done:
        if t is not waiter and not t.cancelled() and t.exception():
            log.error("consumer crashed: %r", t.exception())
    await dispatcher.stop()
    blocking.shutdown()
    try:  # acks and naks out before closing; no drain: the pull subscriptions are gone already
        await nc.flush(timeout=2)
    except Exception as exc:  # noqa: BLE001 - NATS unreachable at shutdown: unacked messages are redelivered
        log.warning("final flush failed: %s", exc)
    await obs.stop()
    await nc.close()


def main() -> None:
    settings = Settings()
    setup_logging("clearml-forwarder", settings.log_level)
    run_until_signalled(lambda stop: run(settings, stop))


if __name__ == "__main__":
    main()
