"""HTTP and WebSocket routes: thin; they check the handshake and hand the socket to a :class:`Session`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, WebSocket
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from pydantic import ValidationError
from starlette.status import WS_1008_POLICY_VIOLATION

from .adapters.jetstream import Fanout
from .domain import Subscribe, origin_allowed
from .session import Session
from .settings import NotifierSettings

router = APIRouter()


@dataclass
class Hub:
    """What the lifespan built and every route needs: the settings, the NATS connection, the shared feeds."""

    settings: NotifierSettings
    nc: NATS
    js: JetStreamContext
    fanout: Fanout


def http_hub(request: Request) -> Hub:
    return request.app.state.hub  # type: ignore[no-any-return]


def ws_hub(websocket: WebSocket) -> Hub:
    return websocket.app.state.hub  # type: ignore[no-any-return]


HttpHub = Annotated[Hub, Depends(http_hub)]
WsHub = Annotated[Hub, Depends(ws_hub)]
Cursor = Annotated[int | None, Query(ge=0, description="Last stream sequence the client already has.")]


@router.get("/healthz")
async def healthz(hub: HttpHub) -> dict[str, object]:
    """Liveness, and whether NATS is connected right now."""
    return {"status": "ok", "nats": hub.nc.is_connected}


@router.websocket("/api/v1/ws/jobs/{job_id}")
async def job_socket(
    websocket: WebSocket, job_id: str, hub: WsHub,
    after_events: Cursor = None, after_logs: Cursor = None, heartbeats: bool = False,
) -> None:
    """One job's events and log batches: history after the cursor, then live."""
    if not await _handshake(websocket, hub):
        return
    session = Session(websocket, hub.fanout, hub.settings)
    try:
        opening = Subscribe(
            op="subscribe", job_id=job_id, after_events=after_events, after_logs=after_logs, heartbeats=heartbeats)
    except ValidationError as exc:
        await session.fail(exc.errors()[0]["msg"], WS_1008_POLICY_VIOLATION)
        return
    await session.run(opening=opening)


@router.websocket("/api/v1/ws")
async def multi_socket(websocket: WebSocket, hub: WsHub) -> None:
    """Any number of job or project subscriptions, driven by the client's subscribe/unsubscribe messages."""
    if not await _handshake(websocket, hub):
        return
    session = Session(websocket, hub.fanout, hub.settings)
    await session.run(on_text=session.handle_op)


async def _handshake(websocket: WebSocket, hub: Hub) -> bool:
    # Closing before accept makes the server answer the handshake with HTTP 403.
    if not origin_allowed(websocket.headers.get("origin"), hub.settings.allowed_origins):
        await websocket.close(code=WS_1008_POLICY_VIOLATION)
        return False
    await websocket.accept()
    return True
