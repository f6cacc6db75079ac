"""Resumable checkpoints: full training state, one file per epoch, never rewritten once written.

Ultralytics rewrites ``last.pt`` in place every epoch and, when training ends (finished or stopped), strips it
of the optimizer and the epoch: a stopped attempt's ``last.pt`` cannot be resumed from, and a file rewritten in
place cannot be fetched safely by another runner while the old trainer may still write it. So the Ultralytics
integration copies ``last.pt`` right after a save, as ``resume-epoch<N>.pt``, and stores that copy as an
artifact: at most once per checkpoint interval while training, and at once when Kiln asks the trainer to stop
(cancel or hand-back). Once the store holds it, ``$KILN_JOB_DIR/resume.json`` names it (uri, sha256, size,
epoch): the runner passes that to the next attempt, which fetches the file and checks its SHA-256 before
resuming.

Old copies are deleted (here and in the store), but only once a newer one has replaced them for
``KILN_RESUME_KEEP_S`` seconds (default 600), and the two newest always stay: a runner that froze holds an older
record in the running registry than its trainer, which trains on, has written since, and the retry that the
reaper starts from that record must still find its file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

PREFIX = "resume-epoch"
RECORD = "resume.json"
KEEP = 2
KEEP_ENV = "KILN_RESUME_KEEP_S"
_NAME = re.compile(rf"{PREFIX}(\d+)\.pt")


def is_resume_file(path: Path) -> bool:
    return _NAME.fullmatch(path.name) is not None


def snapshot(last: Path, epoch: int) -> Path:
    """Copy ``last`` to ``resume-epoch<epoch>.pt`` beside it (written whole, then renamed into place)."""
    dest = last.with_name(f"{PREFIX}{epoch}.pt")
    tmp = last.with_name(f".{dest.name}.tmp")
    shutil.copyfile(last, tmp)  # sendfile on Linux: no pass through Python
    os.replace(tmp, dest)
    return dest


def keep_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get(KEEP_ENV) or 600.0))
    except ValueError:
        return 600.0


class Copies:
    """The copies of one training, newest last, each with the time a newer one replaced it.

    Example:
        >>> c = Copies(keep_s=10)
        >>> [c.add(Path(f"resume-epoch{e}.pt"), t) for e, t in ((1, 0), (2, 5), (3, 6), (4, 20))]
        [[], [], [], [PosixPath('resume-epoch1.pt'), PosixPath('resume-epoch2.pt')]]
    """

    def __init__(self, keep_s: float | None = None) -> None:
        self.keep_s = keep_seconds() if keep_s is None else keep_s
        self.items: list[tuple[Path, float | None]] = []

    def add(self, copy: Path, now: float) -> list[Path]:
        """Record ``copy`` (the newest); returns the older copies to delete now (already unlinked here)."""
        if self.items:
            self.items[-1] = (self.items[-1][0], now)
        self.items.append((copy, None))
        stale = [p for p, since in self.items[:-KEEP] if since is not None and now - since >= self.keep_s]
        self.items = [item for item in self.items if item[0] not in stale]
        for path in stale:
            path.unlink(missing_ok=True)
        return stale


def write_record(job_dir: Path, payload: dict[str, Any]) -> None:
    """Name the stored copy in ``job_dir/resume.json`` (replaced atomically; an older epoch never wins)."""
    path = job_dir / RECORD
    try:
        current = json.loads(path.read_text())
        if int(current.get("epoch") or 0) > int(payload.get("epoch") or 0):
            return
    except (OSError, ValueError):
        pass
    tmp = job_dir / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)
