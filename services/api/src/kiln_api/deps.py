"""FastAPI dependencies as Annotated aliases."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy.ext.asyncio import AsyncConnection

from .adapters.bus import Bus
from .settings import Settings


async def _conn(request: Request) -> AsyncIterator[AsyncConnection]:
    async with request.app.state.engine.connect() as conn:
        yield conn


def _bus(request: Request) -> Bus:
    bus = request.app.state.bus
    if bus is None or not bus.nc.is_connected:
        raise HTTPException(503, "message bus (NATS) is not reachable; try again shortly")
    return bus


def _settings(request: Request) -> Settings:
    return request.app.state.settings


ConnDep = Annotated[AsyncConnection, Depends(_conn)]
BusDep = Annotated[Bus, Depends(_bus)]
SettingsDep = Annotated[Settings, Depends(_settings)]
