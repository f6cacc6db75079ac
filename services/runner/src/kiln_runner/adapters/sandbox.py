"""Trainers under their own Unix user: one uid per slot, so that user code reads neither the runner's secrets nor
another attempt's files (docs/security.md, "The runner's side").

With ``KILN_RUNNER_TRAINER_UID_BASE`` set, slot ``i`` runs its trainer as uid and gid ``base + i`` (no account
needed: a numeric id is enough for the kernel).  Before the spawn the runner opens the attempt's job folder to that
uid alone (:meth:`TrainerUsers.hand_over`) and gives it the attempt's creds file (0600); what the runner keeps (its
own creds and spool, the trainer signing key, other attempts' folders) stays out of its reach.  The runner must run as root to do this, and says so at start
otherwise.  Without the setting trainers run as the runner's user, as before.

Example:
    >>> TrainerUsers(61000).uid(2), TrainerUsers(61000).env(Path("/w/jobs/j1"))["HOME"]
    (61002, '/w/jobs/j1')
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MAX_ID = 2**31 - 2  # uid_t is 32 bits; -1 (and 2^32-1) mean "unchanged"


class SandboxError(RuntimeError):
    """The runner cannot give trainers their own users (not root, or a bad range)."""


@dataclass(frozen=True)
class TrainerUsers:
    base: int

    @classmethod
    def checked(cls, base: int, slots: int) -> TrainerUsers:
        """The range for ``slots`` slots, refused when this process cannot switch users or the range is unsafe."""
        if base < 1000 or base + slots > MAX_ID:
            raise SandboxError(f"trainer uid base {base}: use a free range at or above 1000 (system users live below)")
        if os.geteuid() != 0:
            raise SandboxError("trainer_uid_base needs the runner to run as root (it hands each job folder to the "
                               "slot's uid and starts the trainer as that uid)")
        return cls(base)

    def uid(self, slot: int) -> int:
        return self.base + slot

    def env(self, job_dir: Path) -> dict[str, str]:
        """Where the trainer may write its own files (caches, configs): its job folder, not the runner's home."""
        return {"HOME": str(job_dir), "XDG_CACHE_HOME": str(job_dir / ".cache"),
                "XDG_CONFIG_HOME": str(job_dir / ".config"), "MPLCONFIGDIR": str(job_dir / ".config" / "matplotlib")}

    def hand_over(self, job_dir: Path, slot: int, give: tuple[Path, ...] = (), keep: tuple[Path, ...] = ()) -> None:
        """Open the attempt's folder to the slot's uid and no one else, before its trainer starts.

        The folder stays the runner's, with the slot's group and mode 1770: the trainer creates what it writes,
        and the sticky bit keeps it from deleting or renaming the runner's own entries (``job.json``, which names
        the job its spool may speak for, and ``keep``: folders made here first, the runner's, mode 0700, such as
        its own spool, so the trainer cannot plant them).  ``give``: files that become the trainer's (its creds).
        """
        gid = self.uid(slot)
        for folder in keep:
            folder.mkdir(mode=0o700, exist_ok=True)
            if folder.stat().st_uid != os.geteuid():
                raise SandboxError(f"{folder} is not the runner's")
        for path in give:
            os.chown(path, gid, gid, follow_symlinks=False)
        os.chown(job_dir, -1, gid)
        os.chmod(job_dir, 0o1770)
