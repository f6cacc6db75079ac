"""FastAPI dependencies as Annotated aliases."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy.ext.asyncio import AsyncConnection

from .adapters.bus import Bus
from .adapters.event_creds import ThirdPartyIssuer
from .metrics import ApiMetrics
from .settings import Settings

NO_EVENT_CREDENTIALS = (
    "third-party event credentials are not available: this API runs without NATS auth settings "
    "(KILN_API_NATS_CREDS_FILE and KILN_API_NATS_TRUST_DIR; `kiln up` sets them when it runs NATS with JWT auth)")


async def _conn(request: Request) -> AsyncIterator[AsyncConnection]:
    async with request.app.state.engine.connect() as conn:
        yield conn


def _bus(request: Request) -> Bus:
    bus = request.app.state.bus
    if bus is None or not bus.nc.is_connected:
        raise HTTPException(503, "message bus (NATS) is not reachable; try again shortly")
    return bus


def _issuer(request: Request) -> ThirdPartyIssuer:
    issuer = getattr(request.app.state, "event_creds", None)
    if issuer is None:
        raise HTTPException(503, NO_EVENT_CREDENTIALS)
    return issuer


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _metrics(request: Request) -> ApiMetrics:
    return request.app.state.metrics


ConnDep = Annotated[AsyncConnection, Depends(_conn)]
MetricsDep = Annotated[ApiMetrics, Depends(_metrics)]
BusDep = Annotated[Bus, Depends(_bus)]
SettingsDep = Annotated[Settings, Depends(_settings)]
IssuerDep = Annotated[ThirdPartyIssuer, Depends(_issuer)]
