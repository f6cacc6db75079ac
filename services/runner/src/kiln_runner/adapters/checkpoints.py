"""The resumable checkpoint of an earlier attempt: found in a job folder, fetched for the next attempt, verified.

A trainer that uses the Kiln SDK stores a full-state copy of its checkpoint (``resume-epoch<N>.pt``, never rewritten)
in the artifact store and names it in ``$KILN_JOB_DIR/resume.json``. The runner reports that record in the running
registry with each heartbeat and passes it on in the next attempt's start command (hand-back or reaper), so a
retry on any host fetches exactly that file and checks its SHA-256 before the trainer resumes from it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json

from collections.abc import Callable
from pathlib import Path
from typing import Any

RECORD = "resume.json"
CHUNK = 1 << 20


class CheckpointError(Exception):
    """The checkpoint to resume from cannot be used; the message is the attempt's failure reason."""


def read_record(job_dir: Path) -> dict[str, Any] | None:
    """The stored checkpoint a trainer named in ``resume.json`` (uri, sha256, epoch), or None."""
    try:
        rec = json.loads((job_dir / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("uri"), str) or not isinstance(rec.get("sha256"), str):
        return None
    return {"uri": rec["uri"], "sha256": rec["sha256"], "epoch": rec.get("epoch"), "name": rec.get("name")}


def resume_fields(rec: dict[str, Any] | None) -> dict[str, Any]:
    """StartJob fields that make the next attempt resume from ``rec`` (empty when there is none)."""
    if not rec:
        return {}
    epoch = rec.get("epoch")
    return {"resume_from": rec["uri"], "resume_sha256": rec["sha256"],
            "resume_epoch": epoch if isinstance(epoch, int) and epoch >= 1 else None}


def _hash_copy(src: Any, dest: Path) -> str:
    h = hashlib.sha256()
    tmp = dest.with_name(f".{dest.name}.partial")
    with open(tmp, "wb") as out:
        while chunk := src.read(CHUNK):
            h.update(chunk)
            out.write(chunk)
    tmp.replace(dest)
    return h.hexdigest()


class CheckpointFetcher:
    """Brings a stored checkpoint into a job folder: only one of the same job, from the runners' own artifact store
    (``<store>/<project>/<job_id>/...``) or from an earlier attempt's folder in this runner's work folder."""

    def __init__(self, artifact_dir: Path | None, work_dir: Path, s3_prefix: str | None,
                 s3_client: Callable[[], Any]) -> None:
        self.artifact_dir = artifact_dir.resolve() if artifact_dir else None
        self.jobs_dir = (work_dir / "jobs").resolve()
        self.s3_prefix = s3_prefix.rstrip("/") + "/" if s3_prefix else None
        self.s3_client = s3_client

    async def fetch(self, uri: str, sha256: str | None, dest_dir: Path, project: str, job_id: str) -> Path:
        """Copy ``uri`` (a checkpoint of ``project``/``job_id``) into ``dest_dir``, check its SHA-256, return it."""
        return await asyncio.to_thread(self._fetch, uri, sha256, dest_dir, project, job_id)

    def _fetch(self, uri: str, sha256: str | None, dest_dir: Path, project: str, job_id: str) -> Path:
        dest_dir.mkdir(parents=True, exist_ok=True)
        name = Path(uri.rsplit("/", 1)[-1]).name or "resume.pt"
        dest = dest_dir / name
        try:
            if uri.startswith("s3://"):
                digest = self._from_s3(uri, dest, project, job_id)
            else:
                digest = self._from_path(Path(uri), dest, project, job_id)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - missing file, store unreachable: the attempt says which
            raise CheckpointError(f"resume checkpoint {uri} could not be fetched: {exc}") from exc
        finally:
            dest.with_name(f".{dest.name}.partial").unlink(missing_ok=True)
        if sha256 and digest != sha256:
            dest.unlink(missing_ok=True)
            raise CheckpointError(f"resume checkpoint {uri} has SHA-256 {digest}, not the recorded {sha256}")
        return dest

    def _from_path(self, path: Path, dest: Path, project: str, job_id: str) -> str:
        path = path.resolve()
        ours = self.artifact_dir is not None and path.is_relative_to(self.artifact_dir / project / job_id)
        if not ours and path.is_relative_to(self.jobs_dir):
            ours = path.relative_to(self.jobs_dir).parts[0].startswith(f"{job_id}-")
        if not ours:
            raise CheckpointError(f"resume checkpoint {path} is not one of job {job_id} in this runner's artifact "
                                  "or work folder")
        with open(path, "rb") as src:
            return _hash_copy(src, dest)

    def _from_s3(self, uri: str, dest: Path, project: str, job_id: str) -> str:
        if self.s3_prefix is None or not uri.startswith(f"{self.s3_prefix}{project}/{job_id}/"):
            raise CheckpointError(f"resume checkpoint {uri} is not one of job {job_id} in this runner's artifact store")
        bucket, _, key = uri[5:].partition("/")
        body = self.s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        try:
            return _hash_copy(body, dest)
        finally:
            body.close()
