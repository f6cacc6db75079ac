"""``Kiln``: the synchronous client (httpx for REST, websockets' sync client for live events)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

import httpx
from kiln_contracts import JobSpec, JobStatus

from . import routes
from .config import Credentials, base_url, resolve
from .download import CHECKSUM_HEADER, CHUNK, Downloaded, Receiver, pick, target
from .errors import KilnError, from_response, unreachable
from .live import Watch, notifier_url
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
OnDrop = Callable[[int | None, float], None]
USER_AGENT = "kiln-client/0.1"


def credentials(url: str | None, api_key: str | None) -> Credentials:
    """The given URL and key, else ``KILN_URL`` / ``KILN_API_KEY``, else the ``kiln login`` config file."""
    if url is not None:
        return Credentials(base_url(url), api_key if api_key is not None else os.environ.get("KILN_API_KEY", ""))
    found = resolve()
    if found is None:
        raise KilnError(None, "no Kiln API configured: run `kiln login URL`, or set KILN_URL and KILN_API_KEY")
    return Credentials(found.url, api_key if api_key is not None else found.api_key)


def headers(creds: Credentials) -> dict[str, str]:
    out = {"User-Agent": USER_AGENT}
    if creds.api_key:
        out["Authorization"] = f"Bearer {creds.api_key}"
    return out


class Kiln:
    """A Kiln API, synchronously.

    Without arguments it uses ``KILN_URL`` / ``KILN_API_KEY`` or what ``kiln login`` saved. Every refusal raises
    :class:`KilnError` (HTTP status and the API's ``detail``).

    Example:
        >>> with Kiln("http://127.0.0.1:8000", api_key) as kiln:  # doctest: +SKIP
        ...     job = kiln.create_job({"model": "yolov8n.yaml", "dataset": "/data/shapes", "train": {"epochs": 3}})
        ...     for ev in kiln.follow(job.id):
        ...         print(ev.kind, ev.event.data)
        ...     kiln.download(job.id, "best.pt", "weights/")
    """

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 30.0,
                 notifier: str | None = None, transport: httpx.BaseTransport | None = None) -> None:
        self.creds = credentials(url, api_key)
        self.url = self.creds.url
        self._notifier = notifier
        self._http = httpx.Client(base_url=self.url + routes.PREFIX, headers=headers(self.creds), timeout=timeout,
                                  transport=transport)

    def __repr__(self) -> str:
        return f"Kiln({self.url!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def send(self, call: routes.Call[T]) -> T:
        """Make one REST call; a refusal raises :class:`KilnError`."""
        try:
            r = self._http.request(call.method, call.path, params=call.params, json=call.json)
        except httpx.TransportError as exc:
            raise unreachable(self.url, exc) from None
        if r.is_error:
            raise from_response(r)
        return call.parse(r)

    # -- jobs -------------------------------------------------------------------------------------------------------
    def create_job(self, spec: JobSpec | Mapping[str, Any], *, start: bool = True) -> JobDetail:
        """Create a job (a ``JobSpec`` or its fields); queued at once unless ``start=False``."""
        return self.send(routes.create_job(spec, start))

    def list_jobs(self, *, project: str | None = None, status: JobStatus | str | None = None, limit: int = 100,
                  offset: int = 0) -> list[Job]:
        """Jobs of your projects, newest first."""
        return self.send(routes.list_jobs(project, status, limit, offset))

    def get_job(self, job_id: str) -> JobDetail:
        return self.send(routes.get_job(job_id))

    def start_job(self, job_id: str) -> JobDetail:
        return self.send(routes.start_job(job_id))

    def cancel_job(self, job_id: str) -> JobDetail:
        return self.send(routes.cancel_job(job_id))

    def rerun_job(self, job_id: str, *, data: Literal["pinned", "latest"] = "pinned") -> JobDetail:
        """A new job with the same recorded spec; ``pinned`` also requires the same dataset snapshot."""
        return self.send(routes.rerun_job(job_id, data))

    def metrics(self, job_id: str, *, keys: Sequence[str] | None = None,
                kind: Literal["epoch", "metrics"] | None = None, max_points: int | None = None) -> Metrics:
        """Metric series by name; ``max_points=0`` for every point (the API downsamples long ones by default)."""
        return self.send(routes.metrics(job_id, keys, kind, max_points))

    def epochs(self, job_id: str) -> list[EpochRow]:
        return self.send(routes.epochs(job_id))

    def logs(self, job_id: str, *, tail: int = 500) -> list[LogEntry]:
        return self.send(routes.logs(job_id, tail))

    def artifacts(self, job_id: str) -> list[Artifact]:
        return self.send(routes.artifacts(job_id))

    def download(self, job_id: str, name: str = "best.pt", dest: str | os.PathLike[str] = ".", *,
                 epoch: int | None = None) -> Downloaded:
        """Download an artifact into folder ``dest`` (or to file ``dest``), checking the SHA-256 the API recorded.

        A mismatch keeps nothing and raises :class:`KilnError`. Artifacts in S3 come from the presigned URL the API
        redirects to, which is fetched without your key.
        """
        path = target(dest, name)
        params = {"epoch": epoch} if epoch is not None else None
        try:
            with self._http.stream("GET", routes.artifact_path(job_id, name), params=params) as r:
                if r.is_redirect:
                    expected = self._recorded_sha(job_id, name, epoch)
                    with httpx.stream("GET", r.headers["location"], timeout=self._http.timeout) as s3:
                        return self._receive(s3, path, expected)
                return self._receive(r, path, r.headers.get(CHECKSUM_HEADER)
                                     or self._recorded_sha(job_id, name, epoch, r))
        except httpx.TransportError as exc:
            raise unreachable(self.url, exc) from None

    def _recorded_sha(self, job_id: str, name: str, epoch: int | None, r: httpx.Response | None = None) -> str | None:
        if r is not None and r.is_error:
            return None
        art = pick(self.artifacts(job_id), name, epoch)
        return art.sha256 if art else None

    def _receive(self, r: httpx.Response, path: Path, expected: str | None) -> Downloaded:
        if r.is_error:
            r.read()
            raise from_response(r)
        rx = Receiver(path)
        try:
            for chunk in r.iter_bytes(CHUNK):
                rx.write(chunk)
        except BaseException:
            rx.abort()
            raise
        return rx.finish(expected)

    # -- accounts ---------------------------------------------------------------------------------------------------
    def me(self) -> Me:
        """Who the key belongs to and their role in each project."""
        return self.send(routes.me())

    def projects(self) -> list[Project]:
        return self.send(routes.list_projects())

    def project(self, project_id: str) -> Project:
        return self.send(routes.get_project(project_id))

    def create_project(self, project_id: str, description: str = "") -> Project:
        return self.send(routes.create_project(project_id, description))

    def keys(self, user_id: str = "me") -> list[ApiKey]:
        return self.send(routes.list_keys(user_id))

    def create_key(self, name: str = "", *, expires_in_days: int | None = None, user_id: str = "me") -> KeyCreated:
        """A new API key; its secret (``.key``) is in this answer only."""
        return self.send(routes.create_key(name, expires_in_days, user_id))

    def revoke_key(self, key_id: str, *, user_id: str = "me") -> None:
        self.send(routes.revoke_key(key_id, user_id))

    # -- live -------------------------------------------------------------------------------------------------------
    def ticket(self, jobs: Sequence[str] = (), projects: Sequence[str] = ()) -> Ticket:
        """A notifier ticket for these jobs and projects (valid 60 s)."""
        return self.send(routes.ws_ticket(jobs, projects))

    @property
    def notifier_url(self) -> str:
        """The notifier's WebSocket URL, from the API's ``/config`` unless given."""
        if self._notifier is None:
            self._notifier = notifier_url(self.send(routes.public_config())["notifier_url"], self.url)
        return self._notifier.rstrip("/")

    def watch(self, jobs: Sequence[str] = (), projects: Sequence[str] = (), *,
              after: Mapping[str, Mapping[str, int]] | None = None, heartbeats: bool = False,
              timeout: float | None = None, on_drop: OnDrop | None = None) -> Iterator[LiveEvent]:
        """Live events of jobs (their history first) and projects (from now, or from ``after``), for as long as you
        iterate: reconnects after any drop and resumes after the last event it yielded, renewing its ticket on time.

        ``timeout`` (seconds) ends the iteration with :class:`WatchTimeout` (a ``TimeoutError``); ``on_drop(code,
        delay)`` hears of each lost connection (its close code, None without one) before the reconnect.
        """
        from .sync_live import iterate

        return iterate(self, Watch(jobs, projects, after, heartbeats), timeout, on_drop)

    def follow(self, job_id: str, *, timeout: float | None = None,
               on_drop: OnDrop | None = None) -> Iterator[LiveEvent]:
        """One job's events and log batches until its ``finished`` event (yielded last)."""
        for ev in self.watch([job_id], timeout=timeout, on_drop=on_drop):
            yield ev
            if ev.kind == "finished" and ev.stream == "events":
                return
