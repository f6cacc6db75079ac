"""Helpers for the notifier tests (no tests here): a real notifier server, tickets, event publishing, WebSocket reading.

The notifier runs with auth on, trusting :data:`PUBLIC_KEY`; :func:`ticket` signs with :data:`PRIVATE_KEY` as the API
would, and :func:`ws_connect` passes a ticket in the ``Sec-WebSocket-Protocol`` header.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nats
import websockets
from kiln_contracts import EpochCompleted, Event, JobFinished, JobStatus, LogBatch, LogLine
from kiln_contracts.streams import ensure_streams
from kiln_contracts.tickets import (
    SUBPROTOCOL,
    TICKET_SUBPROTOCOL_PREFIX,
    TICKET_TTL_S,
    Ticket,
    generate_keypair,
    issue,
)
from nats.js import JetStreamContext
from kiln_notifier.main import build_server
from kiln_notifier.settings import NotifierSettings

from kiln_testing import free_port

PRIVATE_KEY, PUBLIC_KEY = generate_keypair()
"""The tests' stand-in for the API's key pair: :func:`running_notifier` trusts the public half."""

_key_dir: tempfile.TemporaryDirectory[str] | None = None


def public_key_file(public_pem: bytes = PUBLIC_KEY) -> Path:
    """A file holding ``public_pem`` (for ``KILN_NOTIFIER_TICKET_PUBLIC_KEY_FILE``), removed when the process exits."""
    global _key_dir
    if _key_dir is None:
        _key_dir = tempfile.TemporaryDirectory(prefix="kiln-notifier-keys-")
    path = Path(_key_dir.name) / f"{hashlib.sha256(public_pem).hexdigest()[:16]}.pem"
    if not path.exists():
        path.write_bytes(public_pem)
    return path


def ticket(
    jobs: dict[str, str] | None = None, projects: list[str] | None = None, *, sub: str = "user-1",
    ttl_s: int = TICKET_TTL_S, now: float | None = None, private_key: bytes = PRIVATE_KEY,
) -> str:
    """A ticket as ``POST /api/v1/ws-tickets`` would issue it: ``jobs`` maps job id -> project."""
    scope = Ticket(sub=sub, key="kiln_test0001", jobs=jobs or {}, projects=projects or [])
    return issue(scope, private_key, ttl_s=ttl_s, now=now)


@contextmanager
def running_notifier(nats_url: str, **overrides: Any) -> Iterator[str]:
    """Serve a notifier (uvicorn, its own event loop) in a background thread; yields its ``host:port``.

    Auth is on and trusts :data:`PUBLIC_KEY` unless ``overrides`` say otherwise.
    """
    overrides = {"ticket_public_key_file": public_key_file(), "log_level": "WARNING"} | overrides
    settings = NotifierSettings(nats_url=nats_url, port=free_port(), **overrides)
    server = build_server(settings)
    thread = threading.Thread(target=server.run, name="notifier", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("notifier did not start")
        time.sleep(0.02)
    try:
        yield f"127.0.0.1:{settings.port}"
    finally:
        server.should_exit = True
        thread.join(15)


def new_job() -> tuple[str, str]:
    """A fresh (job_id, project), so tests sharing one nats-server never see each other's events."""
    tag = uuid.uuid4().hex[:10]
    return f"job-{tag}", f"proj-{tag}"


class Publisher:
    """Publishes Kiln events of one job like the runner/trainer would (envelope, subject, Nats-Msg-Id)."""

    def __init__(self, js: JetStreamContext, job_id: str, project: str) -> None:
        self.js, self.job_id, self.project, self.seq = js, job_id, project, 0

    async def publish(self, data: Any, source: str = "trainer") -> Event:
        self.seq += 1
        ev = Event.new(job_id=self.job_id, project=self.project, attempt=1, seq=self.seq, source=source, data=data)
        await self.js.publish(ev.subject, ev.to_bytes(), headers=ev.headers())
        return ev

    async def epoch(self, n: int, epochs: int = 3) -> Event:
        return await self.publish(EpochCompleted(epoch=n, epochs=epochs, metrics={"metrics/mAP50(B)": n / 10}))

    async def finished(self) -> Event:
        return await self.publish(JobFinished(status=JobStatus.completed), source="runner")

    async def logs(self, *texts: str) -> Event:
        return await self.publish(LogBatch(lines=[LogLine(text=t) for t in texts]), source="runner")

    async def noisy_logs(self, size: int) -> Event:
        """A log batch of about ``size`` bytes of incompressible text (fills socket buffers quickly)."""
        return await self.logs(*(os.urandom(50).hex() for _ in range(max(1, size // 100))))


async def connect_js(nats_url: str) -> tuple[nats.NATS, JetStreamContext]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_streams(js)
    return nc, js


def ws_connect(address: str, path: str, ticket: str | None = None, **kwargs: Any) -> Any:
    """A websockets client; no proxy from the environment, no compression (byte counts stay predictable).

    With ``ticket``, it offers ``kiln.v1`` and ``kiln.ticket.<ticket>`` as subprotocols (a browser's way to send it).
    """
    if ticket is not None:
        kwargs.setdefault("subprotocols", [SUBPROTOCOL, TICKET_SUBPROTOCOL_PREFIX + ticket])
    kwargs.setdefault("compression", None)
    return websockets.connect(f"ws://{address}{path}", proxy=None, open_timeout=10, **kwargs)


async def next_message(ws: Any, timeout: float = 10.0) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))  # type: ignore[no-any-return]


async def expect(ws: Any, kind: str, timeout: float = 10.0) -> dict[str, Any]:
    """Next message, which must be of type ``kind``."""
    msg = await next_message(ws, timeout)
    assert msg["type"] == kind, msg
    return msg


async def authorized(ws: Any, timeout: float = 10.0) -> dict[str, Any]:
    """The ``authorized`` message every socket with a valid ticket starts with."""
    msg = await expect(ws, "authorized", timeout)
    assert msg["expires_at"] > time.time(), msg
    return msg


async def closed_with(ws: Any, timeout: float = 10.0) -> tuple[int, list[dict[str, Any]]]:
    """Read until the server closes; the close code and the messages that came before it."""
    received: list[dict[str, Any]] = []
    try:
        while True:
            received.append(json.loads(await asyncio.wait_for(ws.recv(), timeout)))
    except websockets.ConnectionClosed as closed:
        assert closed.rcvd is not None, "closed without a close frame from the server"
        return closed.rcvd.code, received


async def events(ws: Any, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The next ``n`` messages, which must all be events."""
    return [await expect(ws, "event", timeout) for _ in range(n)]


async def silence(ws: Any, wait: float = 0.5) -> None:
    """Nothing more arrives within ``wait`` seconds (no duplicate, no stray event)."""
    try:
        msg = await asyncio.wait_for(ws.recv(), wait)
    except asyncio.TimeoutError:
        return
    raise AssertionError(f"unexpected message: {msg}")


def ids(messages: list[dict[str, Any]]) -> list[str]:
    return [m["event"]["id"] for m in messages]


def small_window_socket(address: str) -> socket.socket:
    """A connected socket with a tiny receive buffer: a client that stops reading then stalls the server sooner."""
    host, port = address.split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.setblocking(False)
    return sock
