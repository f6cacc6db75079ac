"""Every REST call the client makes, without I/O: method, path, query, body and how to read the answer.

``Kiln`` (sync) and ``AsyncKiln`` send the same :class:`Call` objects, so a route is described once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import quote

import httpx
from kiln_contracts import JobSpec, JobStatus
from pydantic import BaseModel, TypeAdapter, ValidationError

from .errors import KilnError
from .models import (
    ApiKey,
    Artifact,
    EpochRow,
    Job,
    JobDetail,
    KeyCreated,
    LogEntry,
    Me,
    Metrics,
    Project,
    Ticket,
)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
PREFIX = "/api/v1"


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, Any] | None = None
    json: Any = None


def _one(model: type[M]) -> Callable[[httpx.Response], M]:
    return lambda r: model.model_validate(r.json())


def _many(model: type[M]) -> Callable[[httpx.Response], list[M]]:
    adapter = TypeAdapter(list[model])  # type: ignore[valid-type]
    return lambda r: adapter.validate_python(r.json())


def _nothing(_: httpx.Response) -> None:
    return None


def _seg(value: str) -> str:
    """A path segment, escaped (an id never changes the path it is put in)."""
    return quote(str(value), safe="")


def job_spec(spec: JobSpec | Mapping[str, Any]) -> JobSpec:
    """``spec`` checked here, before it is sent: a bad field is a :class:`KilnError` naming it."""
    if isinstance(spec, JobSpec):
        return spec
    try:
        return JobSpec.model_validate(dict(spec))
    except ValidationError as exc:
        raise KilnError(None, exc.errors(include_url=False, include_input=False)) from None


# -- jobs -----------------------------------------------------------------------------------------------------------

def create_job(spec: JobSpec | Mapping[str, Any], start: bool = True) -> Call[JobDetail]:
    body = job_spec(spec).model_dump(mode="json") | {"start": start}
    return Call("POST", "/jobs", _one(JobDetail), json=body)


def list_jobs(project: str | None = None, status: JobStatus | str | None = None, limit: int = 100,
              offset: int = 0) -> Call[list[Job]]:
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    if project:
        params["project"] = project
    if status:
        params["status"] = JobStatus(status).value
    return Call("GET", "/jobs", _many(Job), params=params)


def get_job(job_id: str) -> Call[JobDetail]:
    return Call("GET", f"/jobs/{_seg(job_id)}", _one(JobDetail))


def start_job(job_id: str) -> Call[JobDetail]:
    return Call("POST", f"/jobs/{_seg(job_id)}/start", _one(JobDetail))


def cancel_job(job_id: str) -> Call[JobDetail]:
    return Call("POST", f"/jobs/{_seg(job_id)}/cancel", _one(JobDetail))


def rerun_job(job_id: str, data: Literal["pinned", "latest"] = "pinned") -> Call[JobDetail]:
    return Call("POST", f"/jobs/{_seg(job_id)}/rerun", _one(JobDetail), params={"data": data})


def metrics(job_id: str, keys: Sequence[str] | None = None, kind: Literal["epoch", "metrics"] | None = None,
            max_points: int | None = None) -> Call[Metrics]:
    params: dict[str, Any] = {} if max_points is None else {"max_points": max_points}
    if keys:
        params["keys"] = ",".join(keys)
    if kind:
        params["kind"] = kind
    return Call("GET", f"/jobs/{_seg(job_id)}/metrics", _one(Metrics), params=params)


def epochs(job_id: str) -> Call[list[EpochRow]]:
    return Call("GET", f"/jobs/{_seg(job_id)}/epochs", _many(EpochRow))


def logs(job_id: str, tail: int = 500) -> Call[list[LogEntry]]:
    return Call("GET", f"/jobs/{_seg(job_id)}/logs", _many(LogEntry), params={"tail": tail})


def artifacts(job_id: str) -> Call[list[Artifact]]:
    return Call("GET", f"/jobs/{_seg(job_id)}/artifacts", _many(Artifact))


def artifact_path(job_id: str, name: str) -> str:
    return f"/jobs/{_seg(job_id)}/artifacts/{_seg(name)}"


# -- accounts -------------------------------------------------------------------------------------------------------

def me() -> Call[Me]:
    return Call("GET", "/me", _one(Me))


def list_projects() -> Call[list[Project]]:
    return Call("GET", "/projects", _many(Project))


def get_project(project_id: str) -> Call[Project]:
    return Call("GET", f"/projects/{_seg(project_id)}", _one(Project))


def create_project(project_id: str, description: str = "") -> Call[Project]:
    return Call("POST", "/projects", _one(Project), json={"id": project_id, "description": description})


def list_keys(user_id: str = "me") -> Call[list[ApiKey]]:
    return Call("GET", f"/users/{_seg(user_id)}/keys", _many(ApiKey))


def create_key(name: str = "", expires_in_days: int | None = None, user_id: str = "me") -> Call[KeyCreated]:
    return Call("POST", f"/users/{_seg(user_id)}/keys", _one(KeyCreated),
                json={"name": name, "expires_in_days": expires_in_days})


def revoke_key(key_id: str, user_id: str = "me") -> Call[None]:
    return Call("DELETE", f"/users/{_seg(user_id)}/keys/{_seg(key_id)}", _nothing)


# -- live -----------------------------------------------------------------------------------------------------------

def ws_ticket(jobs: Sequence[str] = (), projects: Sequence[str] = ()) -> Call[Ticket]:
    return Call("POST", "/ws-tickets", _one(Ticket), json={"jobs": list(jobs), "projects": list(projects)})


def public_config() -> Call[dict[str, Any]]:
    return Call("GET", "/config", lambda r: dict(r.json()))
