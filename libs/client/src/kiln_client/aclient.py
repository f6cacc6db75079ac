"""``AsyncKiln``: the asyncio client, the same calls as :class:`kiln_client.Kiln` (each awaited)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

import httpx
from kiln_contracts import JobSpec, JobStatus
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from . import routes
from .client import OnDrop, credentials, headers
from .download import CHECKSUM_HEADER, CHUNK, Downloaded, Receiver, pick, target
from .errors import KilnError, from_response, unreachable
from .live import Grant, Schedule, Watch, WatchTimeout, after_drop, notifier_url, offer, retriable
from .models import (
    ApiKey,
    Artifact,
    EpochRow,
    Job,
    JobDetail,
    KeyCreated,
    LiveEvent,
    LogEntry,
    Me,
    Metrics,
    Project,
    Ticket,
)

T = TypeVar("T")


class AsyncKiln:
    """A Kiln API, with asyncio.

    Example:
        >>> async with AsyncKiln("http://127.0.0.1:8000", api_key) as kiln:  # doctest: +SKIP
        ...     job = await kiln.create_job({"model": "yolov8n.yaml", "dataset": "/data/shapes"})
        ...     async for ev in kiln.watch(projects=["vision"]):
        ...         print(ev.event.job_id, ev.kind)
    """

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 30.0,
                 notifier: str | None = None, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.creds = credentials(url, api_key)
        self.url = self.creds.url
        self._notifier = notifier
        self._http = httpx.AsyncClient(base_url=self.url + routes.PREFIX, headers=headers(self.creds),
                                       timeout=timeout, transport=transport)

    def __repr__(self) -> str:
        return f"AsyncKiln({self.url!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(self, call: routes.Call[T]) -> T:
        try:
            r = await self._http.request(call.method, call.path, params=call.params, json=call.json)
        except httpx.TransportError as exc:
            raise unreachable(self.url, exc) from None
        if r.is_error:
            raise from_response(r)
        return call.parse(r)

    # -- jobs -------------------------------------------------------------------------------------------------------
    async def create_job(self, spec: JobSpec | Mapping[str, Any], *, start: bool = True) -> JobDetail:
        return await self.send(routes.create_job(spec, start))

    async def list_jobs(self, *, project: str | None = None, status: JobStatus | str | None = None,
                        limit: int = 100, offset: int = 0) -> list[Job]:
        return await self.send(routes.list_jobs(project, status, limit, offset))

    async def get_job(self, job_id: str) -> JobDetail:
        return await self.send(routes.get_job(job_id))

    async def start_job(self, job_id: str) -> JobDetail:
        return await self.send(routes.start_job(job_id))

    async def cancel_job(self, job_id: str) -> JobDetail:
        return await self.send(routes.cancel_job(job_id))

    async def rerun_job(self, job_id: str, *, data: Literal["pinned", "latest"] = "pinned") -> JobDetail:
        return await self.send(routes.rerun_job(job_id, data))

    async def metrics(self, job_id: str, *, keys: Sequence[str] | None = None,
                      kind: Literal["epoch", "metrics"] | None = None, max_points: int | None = None) -> Metrics:
        return await self.send(routes.metrics(job_id, keys, kind, max_points))

    async def epochs(self, job_id: str) -> list[EpochRow]:
        return await self.send(routes.epochs(job_id))

    async def logs(self, job_id: str, *, tail: int = 500) -> list[LogEntry]:
        return await self.send(routes.logs(job_id, tail))

    async def artifacts(self, job_id: str) -> list[Artifact]:
        return await self.send(routes.artifacts(job_id))

    async def download(self, job_id: str, name: str = "best.pt", dest: str | os.PathLike[str] = ".", *,
                       epoch: int | None = None) -> Downloaded:
        """See :meth:`kiln_client.Kiln.download`."""
        path = target(dest, name)
        params = {"epoch": epoch} if epoch is not None else None
        try:
            async with self._http.stream("GET", routes.artifact_path(job_id, name), params=params) as r:
                if r.is_redirect:
                    expected = await self._recorded_sha(job_id, name, epoch)
                    async with httpx.AsyncClient(timeout=self._http.timeout) as bare, \
                            bare.stream("GET", r.headers["location"]) as s3:
                        return await self._receive(s3, path, expected)
                expected = r.headers.get(CHECKSUM_HEADER)
                if expected is None and not r.is_error:
                    expected = await self._recorded_sha(job_id, name, epoch)
                return await self._receive(r, path, expected)
        except httpx.TransportError as exc:
            raise unreachable(self.url, exc) from None

    async def _recorded_sha(self, job_id: str, name: str, epoch: int | None) -> str | None:
        art = pick(await self.artifacts(job_id), name, epoch)
        return art.sha256 if art else None

    async def _receive(self, r: httpx.Response, path: Path, expected: str | None) -> Downloaded:
        if r.is_error:
            await r.aread()
            raise from_response(r)
        rx = Receiver(path)
        try:
            async for chunk in r.aiter_bytes(CHUNK):
                rx.write(chunk)
        except BaseException:
            rx.abort()
            raise
        return rx.finish(expected)

    # -- accounts ---------------------------------------------------------------------------------------------------
    async def me(self) -> Me:
        return await self.send(routes.me())

    async def projects(self) -> list[Project]:
        return await self.send(routes.list_projects())

    async def project(self, project_id: str) -> Project:
        return await self.send(routes.get_project(project_id))

    async def create_project(self, project_id: str, description: str = "") -> Project:
        return await self.send(routes.create_project(project_id, description))

    async def keys(self, user_id: str = "me") -> list[ApiKey]:
        return await self.send(routes.list_keys(user_id))

    async def create_key(self, name: str = "", *, expires_in_days: int | None = None,
                         user_id: str = "me") -> KeyCreated:
        return await self.send(routes.create_key(name, expires_in_days, user_id))

    async def revoke_key(self, key_id: str, *, user_id: str = "me") -> None:
        await self.send(routes.revoke_key(key_id, user_id))

    # -- live -------------------------------------------------------------------------------------------------------
    async def ticket(self, jobs: Sequence[str] = (), projects: Sequence[str] = ()) -> Ticket:
        return await self.send(routes.ws_ticket(jobs, projects))

    async def notifier_url(self) -> str:
        if self._notifier is None:
            self._notifier = notifier_url((await self.send(routes.public_config()))["notifier_url"], self.url)
        return self._notifier.rstrip("/")

    async def watch(self, jobs: Sequence[str] = (), projects: Sequence[str] = (), *,
                    after: Mapping[str, Mapping[str, int]] | None = None, heartbeats: bool = False,
                    timeout: float | None = None, on_drop: OnDrop | None = None) -> AsyncIterator[LiveEvent]:
        """See :meth:`kiln_client.Kiln.watch`."""
        watch = Watch(jobs, projects, after, heartbeats)
        deadline = None if timeout is None else time.monotonic() + timeout
        url = await self.notifier_url() + "/api/v1/ws"
        attempt = 0
        while True:
            code: int | None = None
            plan: Schedule | None = None
            try:
                g = await self._grant(watch)
                protocols, first = offer(g.ticket if g else None)
                async with connect(url, subprotocols=protocols,  # type: ignore[arg-type]
                                   compression=None, max_size=None, open_timeout=10) as ws:
                    if first:
                        await ws.send(json.dumps(first))
                    for op in watch.subscribe_ops():
                        await ws.send(json.dumps(op))
                    plan = Schedule(g, deadline)
                    async for ev in self._session(watch, ws, plan):
                        yield ev
            except WatchTimeout:
                raise
            except ConnectionClosed as closed:
                code = closed.rcvd.code if closed.rcvd else None
            except InvalidStatus as exc:
                if exc.response.status_code < 500:
                    raise KilnError(exc.response.status_code,
                                    f"the notifier at {self._notifier} refused the connection") from None
            except KilnError as exc:
                if not retriable(exc):
                    raise
            except (OSError, WebSocketException):
                pass
            delay, attempt = after_drop(code, attempt, plan is not None and plan.heard, deadline, on_drop)
            await asyncio.sleep(delay)

    async def follow(self, job_id: str, *, timeout: float | None = None,
                     on_drop: OnDrop | None = None) -> AsyncIterator[LiveEvent]:
        """One job's events and log batches until its ``finished`` event (yielded last)."""
        async for ev in self.watch([job_id], timeout=timeout, on_drop=on_drop):
            yield ev
            if ev.kind == "finished" and ev.stream == "events":
                return

    async def _grant(self, watch: Watch) -> Grant | None:
        try:
            t = await self.ticket(**watch.scope())
        except KilnError as exc:
            if exc.status == 503:
                return None
            raise
        return Grant(t.ticket, t.renew_within_s, time.monotonic())

    async def _session(self, watch: Watch, ws: ClientConnection, plan: Schedule) -> AsyncIterator[LiveEvent]:
        while True:
            now = time.monotonic()
            if plan.expired(now):
                raise WatchTimeout()
            if plan.renew_due(now):
                g = await self._grant(watch)
                if g is None:
                    plan.renew_at = None
                else:
                    await ws.send(json.dumps({"op": "renew", "ticket": g.ticket}))
                    plan.renewed(g)
            for key in plan.resubscribe_due(now):
                await ws.send(json.dumps(watch.subscribe_op(key)))
            try:
                raw = await asyncio.wait_for(ws.recv(), plan.wait(time.monotonic()))
            except TimeoutError:
                continue
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            step = watch.handle(msg)
            plan.apply(step, time.monotonic())
            if step.event is not None:
                yield step.event
