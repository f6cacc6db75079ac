"""Application factory: FastAPI app whose lifespan owns the NATS connection."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from kiln_contracts.natsauth import permissions
from nats.aio.client import Client as NATS

from kiln_contracts.natsauth import client as identity
from kiln_observability import Health, new_registry
from kiln_observability.asgi import add_routes

from .adapters.consumers import NamedConsumers
from .adapters.jetstream import Fanout
from .auth import Tickets
from .handlers import Hub, router
from .metrics import NotifierMetrics
from .settings import NotifierSettings

log = logging.getLogger(__name__)


def create_app(settings: NotifierSettings) -> FastAPI:
    """Build the notifier app; it connects to NATS when served (lifespan), never at import or build time."""
    tickets = None
    if settings.auth != "off":  # fail closed: auth on without a key is a bug, never an open notifier
        if settings.public_key is None:
            raise RuntimeError("auth is on but no ticket public key was loaded")
        tickets = Tickets(settings.public_key, settings.recheck_s)

    role = permissions.notifier()
    inbox = identity.inbox_prefix(settings.nats_inbox_prefix, settings.nats_creds_file, role)
    registry, health = new_registry(), Health()
    metrics = NotifierMetrics(registry)
    connection: list[NATS] = []  # the lifespan's, once made: not ready before
    health.add("nats", lambda: bool(connection) and connection[0].is_connected)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nc = NATS()

        async def disconnected() -> None:
            if not nc.is_closed:  # closing at shutdown also reports a disconnect: not worth a warning
                log.warning("NATS disconnected; ordered consumers resume from their last sequence on reconnect")

        await nc.connect(
            servers=identity.servers(settings.nats_url),
            name="kiln-notifier",
            max_reconnect_attempts=-1,  # a NATS restart must not take the notifier down with it
            error_cb=_log_nats_error,
            disconnected_cb=disconnected,
            reconnected_cb=_log_reconnected,
            **identity.connect_options(settings.nats_creds_file, inbox, settings.nats_tls),
        )
        js = NamedConsumers(nc)  # ordered consumers by name: permissions can pin them (adapters/consumers.py)
        try:
            await identity.prepare_streams(js, settings.nats_creds_file, role.streams, settings.streams_wait_s)
        except BaseException:
            await nc.close()
            raise
        fanout = Fanout(js, idle_heartbeat=settings.consumer_idle_heartbeat_s)
        app.state.hub = Hub(settings=settings, nc=nc, js=js, fanout=fanout, tickets=tickets, metrics=metrics)
        metrics.feeds = lambda: len(fanout)
        connection.append(nc)
        log.info("notifier connected to %s", nc.connected_url.netloc if nc.connected_url else settings.nats_url)
        try:
            yield
        finally:
            health.draining = True
            await nc.close()

    app = FastAPI(title="Kiln notifier", version="0.1.0", lifespan=lifespan)
    app.include_router(router)
    add_routes(app, registry, health)  # /metrics, /livez, /readyz; /healthz stays in the router
    app.state.registry, app.state.health, app.state.metrics = registry, health, metrics
    return app


async def _log_nats_error(exc: Exception) -> None:
    log.warning("NATS error: %r", exc)


async def _log_reconnected() -> None:
    log.info("NATS reconnected")
