"""HTTP and WebSocket routes: thin; they check the handshake and hand the socket to a :class:`Session`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Request, WebSocket
from kiln_contracts.tickets import CLOSE_UNAUTHORIZED, SUBPROTOCOL
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from starlette.status import WS_1008_POLICY_VIOLATION

from .adapters.jetstream import Fanout
from .auth import TICKET_IN_URL, Tickets, offered_ticket
from .domain import job_socket_op, origin_allowed
from .metrics import NotifierMetrics
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
    tickets: Tickets | None  # None: auth off
    metrics: NotifierMetrics | None = None


def http_hub(request: Request) -> Hub:
    return request.app.state.hub  # type: ignore[no-any-return]


def ws_hub(websocket: WebSocket) -> Hub:
    return websocket.app.state.hub  # type: ignore[no-any-return]


HttpHub = Annotated[Hub, Depends(http_hub)]
WsHub = Annotated[Hub, Depends(ws_hub)]


@router.get("/healthz")
async def healthz(hub: HttpHub) -> dict[str, object]:
    """Liveness, and whether NATS is connected right now."""
    return {"status": "ok", "nats": hub.nc.is_connected}


@router.websocket("/api/v1/ws/jobs/{job_id}")
async def job_socket(websocket: WebSocket, job_id: str, hub: WsHub) -> None:
    """One job's events and log batches: history after the cursor (query), then live; opens once authorized."""
    session = await _authorized_session(websocket, hub)
    if session is None:
        return
    try:
        opening = job_socket_op(job_id, websocket.query_params)
    except ValueError as exc:
        await session.fail(str(exc), WS_1008_POLICY_VIOLATION)
        return
    refused = session.refused(opening)
    if refused is not None:  # a job outside the ticket ends this socket before anything of it is sent
        await session.fail(refused, CLOSE_UNAUTHORIZED)
        return
    await session.run(on_text=session.handle_job_op, opening=opening)


@router.websocket("/api/v1/ws")
async def multi_socket(websocket: WebSocket, hub: WsHub) -> None:
    """Any number of job or project subscriptions, driven by the client's messages once authorized."""
    session = await _authorized_session(websocket, hub)
    if session is None:
        return
    await session.run(on_text=session.handle_op)


async def _authorized_session(websocket: WebSocket, hub: Hub) -> Session | None:
    """Origin, where the ticket is, accept, then the ticket itself; ``None``: refused (and closed)."""
    # Closing before accept makes the server answer the handshake with HTTP 403: a foreign page learns nothing.
    if not origin_allowed(websocket.headers.get("origin"), hub.settings.allowed_origins,
                          listed_only=hub.tickets is not None):
        await websocket.close(code=WS_1008_POLICY_VIOLATION)
        return None
    offered = websocket.scope.get("subprotocols", [])
    try:
        token = offered_ticket(offered)
        problem = TICKET_IN_URL if "ticket" in websocket.query_params else None
    except ValueError as exc:
        token, problem = None, str(exc)
    # Accepted before any ticket is refused: a browser sees a 403 only as an anonymous 1006, but reads a close code.
    # Never the ticket is echoed: kiln.v1 only, or nothing for a client that did not offer it.
    await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    if hub.metrics is not None:
        hub.metrics.connections.inc()
    session = Session(websocket, hub.fanout, hub.settings, hub.tickets, hub.metrics)
    if problem is not None:
        await session.fail(problem, WS_1008_POLICY_VIOLATION)
        return None
    return session if await session.authorize(token) else None
