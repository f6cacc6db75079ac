"""Pure runner logic: how an exited trainer is judged."""

from __future__ import annotations

import signal
from dataclasses import dataclass

from kiln_contracts import ExitClass, JobStatus

EXIT_USER_ERROR = 2
EXIT_CANCELLED = 3
_OOM_MARKERS = ("out of memory", "outofmemoryerror", "cannot allocate memory", "memoryerror")


@dataclass(frozen=True)
class Outcome:
    status: JobStatus
    exit_class: ExitClass
    reason: str


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def classify_exit(code: int, tail: list[str], *, cancelled: bool = False, timed_out: bool = False,
                  cancel_reason: str = "cancelled by user") -> Outcome:
    """Turn an exit code (negative: killed by that signal) and the last log lines into a terminal outcome."""
    text = "\n".join(tail).lower()
    kiln_lines = [ln[len("kiln: "):] for ln in tail if ln.startswith("kiln: ")]
    last = kiln_lines[-1] if kiln_lines else next((ln for ln in reversed(tail) if ln.strip()), "")
    if code == 0 and not cancelled:
        return Outcome(JobStatus.completed, ExitClass.ok, "")
    if timed_out:
        return Outcome(JobStatus.failed, ExitClass.timeout, "wall-clock timeout reached; trainer stopped")
    if cancelled or code == EXIT_CANCELLED:
        return Outcome(JobStatus.cancelled, ExitClass.cancelled, cancel_reason)
    if any(m in text for m in _OOM_MARKERS):
        return Outcome(JobStatus.failed, ExitClass.out_of_memory, f"out of memory (exit code {code}): {last}")
    if code < 0:
        sig = _signal_name(code)
        hint = " (possibly the kernel's OOM killer)" if code == -signal.SIGKILL else ""
        return Outcome(JobStatus.failed, ExitClass.killed, f"trainer killed by {sig}{hint}")
    if code == EXIT_USER_ERROR:
        return Outcome(JobStatus.failed, ExitClass.user_error, last or "invalid job configuration")
    return Outcome(JobStatus.failed, ExitClass.user_error, f"trainer exited with code {code}: {last}")
