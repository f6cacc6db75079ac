"""Pure runner logic: how an exited trainer is judged, and what an unprocessable start command still tells."""

from __future__ import annotations

import json
import re
import signal
from dataclasses import dataclass

from pydantic import ValidationError

from kiln_contracts import ExitClass, JobSpec, JobStatus

EXIT_USER_ERROR = 2
EXIT_CANCELLED = 3
_OOM_MARKERS = ("out of memory", "outofmemoryerror", "cannot allocate memory", "memoryerror")
_HOST_MARKERS = ("cuda error: unspecified launch failure", "cuda error: an illegal memory access", "nccl error",
                 "ncclsystemerror", "cudnn_status_internal_error", "cuda driver version is insufficient",
                 "no cuda gpus are available", "input/output error", "no space left on device", "stale file handle")
"""Failures of the host (GPU, driver, interconnect, disk), not of the job: classed ``infrastructure`` (retried by
default), whatever the exit code."""
_KILN = "kiln: "
_TRACEBACK = "Traceback (most recent call last):"
_FRAME = '  File "'
# The line Python prints last for an uncaught exception: "module.Name: message", or a bare "NameError".
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*: .+|[A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit))$")
_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")  # StartJob.job_id's pattern; also a valid subject token
_MAX_DETAIL = 500


@dataclass(frozen=True)
class Outcome:
    status: JobStatus
    exit_class: ExitClass
    reason: str


@dataclass(frozen=True)
class JobRef:
    """The job and attempt a start command names, read from a command that does not validate."""

    job_id: str
    attempt: int
    project: str


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _short(text: str) -> str:
    return text if len(text) <= _MAX_DETAIL else text[:_MAX_DETAIL] + "…"


def _exception_at(tail: list[str]) -> tuple[int, str] | None:
    """Index and text of the exception line of the last traceback in ``tail``."""
    start = max((i for i, ln in enumerate(tail) if ln.startswith((_TRACEBACK, _FRAME))), default=-1)
    if start < 0:
        return None
    # The first unindented line after the frames: lines printed after it (another stream, a note) come later.
    for i in range(start + 1, len(tail)):
        if _EXCEPTION.match(tail[i]):
            return i, tail[i]
    return None


def trainer_exception(tail: list[str]) -> str | None:
    """The exception (type and message) that ended the trainer, from the traceback in its last log lines.

    The traceback's header may already have left the tail: its frames are enough.

    Example:
        >>> trainer_exception(["Traceback (most recent call last):", '  File "t.py", line 1, in <module>',
        ...                    "ValueError: Seed must be between 0 and 2**32 - 1"])
        'ValueError: Seed must be between 0 and 2**32 - 1'
        >>> trainer_exception(["ValueError: a log line, no traceback"]) is None
        True
    """
    found = _exception_at(tail)
    return found[1] if found else None


def classify_exit(code: int, tail: list[str], *, cancelled: bool = False, timed_out: bool = False,
                  cancel_reason: str = "cancelled by user") -> Outcome:
    """Turn an exit code (negative: killed by that signal) and the last log lines into a terminal outcome.

    The reason names the cause: a ``kiln: ...`` line the trainer printed after any traceback, else the exception
    of the traceback (a ``kiln:`` note printed before training, such as the versions, is not the cause).

    Example:
        >>> classify_exit(1, ["kiln: versions kiln=0.1", "Traceback (most recent call last):",
        ...                   '  File "t.py", line 1, in <module>', "KeyError: 'lr0'"]).reason
        "trainer failed: KeyError: 'lr0' (exit code 1)"
        >>> classify_exit(2, ["kiln: dataset not found: /d"]).reason
        'dataset not found: /d'
    """
    text = "\n".join(tail).lower()
    kiln_at = max((i for i, ln in enumerate(tail) if ln.startswith(_KILN)), default=-1)
    exc = _exception_at(tail)
    if exc is not None and exc[0] > kiln_at:
        failed = f"trainer failed: {_short(exc[1])} (exit code {code})"
        detail = _short(exc[1])
    else:
        last = tail[kiln_at][len(_KILN):] if kiln_at >= 0 else next((ln for ln in reversed(tail) if ln.strip()), "")
        failed = f"trainer exited with code {code}: {_short(last)}"
        detail = _short(last)
    if code == 0 and not cancelled:
        return Outcome(JobStatus.completed, ExitClass.ok, "")
    if timed_out:
        return Outcome(JobStatus.failed, ExitClass.timeout, "wall-clock timeout reached; trainer stopped")
    if cancelled or code == EXIT_CANCELLED:
        return Outcome(JobStatus.cancelled, ExitClass.cancelled, cancel_reason)
    if any(m in text for m in _OOM_MARKERS):
        return Outcome(JobStatus.failed, ExitClass.out_of_memory, f"out of memory (exit code {code}): {detail}")
    if code < 0:
        sig = _signal_name(code)
        hint = " (possibly the kernel's OOM killer)" if code == -signal.SIGKILL else ""
        return Outcome(JobStatus.failed, ExitClass.killed, f"trainer killed by {sig}{hint}")
    if code == EXIT_USER_ERROR and (exc is None or exc[0] < kiln_at):
        return Outcome(JobStatus.failed, ExitClass.user_error, detail or "invalid job configuration")
    if any(m in text for m in _HOST_MARKERS):
        return Outcome(JobStatus.failed, ExitClass.infrastructure, f"host failure: {failed}")
    return Outcome(JobStatus.failed, ExitClass.user_error, failed)


def job_of_invalid_start(data: bytes) -> JobRef | None:
    """The job attempt a start command that fails validation names, when that much of it is usable.

    Python's json reads what the command model refuses (``NaN``, ``1e400`` as inf), so the job can still be ended
    with the reason. Only an unambiguous id and attempt count; a command of another schema version is left alone.

    Example:
        >>> job_of_invalid_start(b'{"job_id": "j1", "attempt": 2, "spec": {"project": "p", "train": {"lr0": NaN}}}')
        JobRef(job_id='j1', attempt=2, project='p')
        >>> job_of_invalid_start(b'{"job_id": "j1", "attempt": "2"}') is None
        True
    """
    try:
        body = json.loads(data)
    except ValueError:  # includes UnicodeDecodeError
        return None
    if not isinstance(body, dict) or body.get("v", 1) != 1:
        return None
    job_id, attempt = body.get("job_id"), body.get("attempt", 1)
    if not isinstance(job_id, str) or not _ID.match(job_id):
        return None
    if type(attempt) is not int or attempt < 1:
        return None
    spec = body.get("spec")
    project = spec.get("project") if isinstance(spec, dict) else None
    return JobRef(job_id, attempt, project if isinstance(project, str) and _ID.match(project) and len(project) <= 64
                  else "default")


def invalid_reason(exc: Exception) -> str:
    """A short reason for a start command that does not validate: where and which rule, first two errors.

    Example:
        >>> invalid_reason(ValueError("not JSON"))
        'invalid start command: not JSON'
    """
    if isinstance(exc, ValidationError):
        errors = exc.errors(include_url=False, include_input=False)
        parts = [(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" if e["loc"] else e["msg"])[:150]
                 for e in errors[:2]]
        more = f" (and {len(errors) - 2} more)" if len(errors) > 2 else ""
        return f"invalid start command: {'; '.join(parts)}{more}"
    return f"invalid start command: {str(exc)[:300]}"


MAX_BACKOFF_S = 3600.0


def retry_after(spec: JobSpec, attempt: int, outcome: Outcome) -> float | None:
    """Seconds before the next attempt of a failed one, or ``None`` when this failure ends the job.

    Retried: a failure whose class is in the job's ``retry_on`` (infrastructure and out of memory by default;
    never a user error), while attempts remain; the wait doubles with each attempt made.

    Example:
        >>> spec = JobSpec(model="m.yaml", dataset="/d", max_attempts=3, retry_backoff_s=10)
        >>> oom = Outcome(JobStatus.failed, ExitClass.out_of_memory, "CUDA out of memory")
        >>> retry_after(spec, 1, oom), retry_after(spec, 2, oom), retry_after(spec, 3, oom)
        (10.0, 20.0, None)
        >>> retry_after(spec, 1, Outcome(JobStatus.failed, ExitClass.user_error, "bad dataset")) is None
        True
    """
    if outcome.status != JobStatus.failed or outcome.exit_class not in spec.retry_on:
        return None
    if attempt >= spec.max_attempts:
        return None
    return min(MAX_BACKOFF_S, spec.retry_backoff_s * 2 ** (attempt - 1))
