"""Thin handlers: run one planned operation of a job against ClearML (through the port) and keep the task map."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from .adapters.clearml import ClearMLPort
from .adapters.task_map import TaskMap
from .domain import (
    PARAMS_SECTION, ConnectParams, JobState, Op, ReportConsole, ReportScalars, SetStatus, Upload, task_name,
)

log = logging.getLogger("kiln.clearml_forwarder")
Keepalive = Callable[[], Awaitable[None]]


class Blocking:
    """Runs the port's blocking calls in its own thread pool, so that ClearML never stalls the event loop.

    While a call is slow, ``keepalive`` runs every ``keepalive_s`` (it keeps the job's messages ours with
    in-progress acks); the call itself is bounded by the HTTP timeouts of the ClearML session.  A call is
    never abandoned and re-issued while it may still reach the server: that is how duplicates are made.
    """

    def __init__(self, port: ClearMLPort, workers: int, keepalive_s: float) -> None:
        self.port, self.keepalive_s = port, keepalive_s
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clearml")

    async def __call__(self, method: str, *args: Any, keepalive: Keepalive) -> Any:
        fut = asyncio.get_running_loop().run_in_executor(self.pool, partial(getattr(self.port, method), *args))
        waited = 0.0
        while True:
            done, _ = await asyncio.wait({fut}, timeout=self.keepalive_s)
            if done:
                return fut.result()
            waited += self.keepalive_s
            log.warning("ClearML %s still running after %.0fs", method, waited)
            await keepalive()

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class Deps:
    clearml: Blocking
    tasks: TaskMap
    tags: list[str] = field(default_factory=lambda: ["kiln"])
    project_prefix: str = ""


async def open_task(job: JobState, deps: Deps, keepalive: Keepalive) -> bool:
    """Create the job's task, or reopen the mapped one; True when the job now has a different task."""
    known = job.task_id
    project = f"{deps.project_prefix}{job.project}"
    job.task_id = await deps.clearml("open_task", job.job_id, project, task_name(job), deps.tags, known,
                                     keepalive=keepalive)
    if job.task_id != known:
        log.info("job %s -> ClearML task %s", job.job_id, job.task_id)
    return job.task_id != known


async def run_op(job: JobState, op: Op, deps: Deps, keepalive: Keepalive) -> None:
    """Carry out one operation; raises when ClearML did not accept it (the caller retries)."""
    assert job.task_id is not None
    call, tid = deps.clearml, job.task_id
    if isinstance(op, ConnectParams):
        await call("connect_params", tid, PARAMS_SECTION, op.values, keepalive=keepalive)
    elif isinstance(op, ReportScalars):
        await call("report_scalars", tid, op.points, keepalive=keepalive)
    elif isinstance(op, ReportConsole):
        await call("report_console", tid, op.lines, keepalive=keepalive)
    elif isinstance(op, Upload):
        await call("upload", tid, op, keepalive=keepalive)
    elif isinstance(op, SetStatus):
        await call("set_status", tid, op.status, op.reason, keepalive=keepalive)


async def release(job: JobState, deps: Deps, keepalive: Keepalive) -> None:
    """The job is idle: let the adapter drop what it holds for the task (offline: the session zip is written)."""
    if job.task_id:
        await deps.clearml("release", job.task_id, keepalive=keepalive)
