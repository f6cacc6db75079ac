"""Exit codes of ``kiln`` that a script can rely on (docs/cli.md)."""

from __future__ import annotations

from kiln_contracts import JobStatus

OK = 0
ERROR = 1  # the API refused (bad key, not found, ...), could not be reached, or a download did not verify
USAGE = 2  # bad arguments (also click's own code for a usage error)
FAILED = 3  # the job failed
CANCELLED = 4  # the job was cancelled
LOST = 5  # the job was lost (its runner vanished and no attempt was left)
TIMEOUT = 6  # --timeout passed before the job finished
INTERRUPTED = 130  # Ctrl-C

BY_STATUS = {JobStatus.completed: OK, JobStatus.failed: FAILED, JobStatus.cancelled: CANCELLED, JobStatus.lost: LOST}


def for_status(status: JobStatus | str) -> int:
    """The exit code for a job that ended in ``status``.

    >>> for_status("completed"), for_status("failed"), for_status(JobStatus.cancelled), for_status("lost")
    (0, 3, 4, 5)
    """
    return BY_STATUS.get(JobStatus(status), ERROR)
