"""Artifacts (checkpoints) hashed, stored and announced from a background thread, never the training thread.

:meth:`kiln_sdk.Run.artifact` only records the request (one ``stat``).  A worker thread then reads the file once,
computing its SHA-256 while copying it to the configured store, checks that the file did not change while it was
read, and reports ``ArtifactStored`` with the stored location as ``uri``:

* no store configured: nothing is copied, ``uri`` is the file's absolute path;
* ``KILN_ARTIFACT_DIR``: a copy under ``<dir>/<project>/<job_id>/<attempt>/<name>`` (written to a temporary file
  and renamed, so a reader never sees half a checkpoint);
* ``KILN_ARTIFACT_S3_URI=s3://bucket/prefix`` (endpoint ``KILN_ARTIFACT_S3_ENDPOINT``, region
  ``KILN_ARTIFACT_S3_REGION``, credentials from boto3's usual environment): uploaded to
  ``<prefix>/<project>/<job_id>/<attempt>/<name>`` with the SHA-256 and epoch as object metadata.  Needs boto3
  (``pip install kiln-trainer-sdk[s3]``).

Checkpoints are rewritten in place every epoch (``last.pt``), so requests for the same path supersede each other:
when the worker is behind, only the newest version is stored (``superseded`` counts the others), and a version
that changed while it was read is dropped if a newer request for it is queued, read again otherwise.  When a store
fails (after retries) the artifact is still announced, with its local path as ``uri``, and the failure is reported
once on stderr: an announcement is never lost.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ._events import Record, start_thread, warn_once
from .context import JobContext

CHUNK = 256 << 10


OnStored = Callable[[dict[str, Any]], None]


@dataclass
class _Request:
    path: Path
    name: str
    epoch: int | None
    version: tuple[int, int, int] | None  # (inode, size, mtime_ns) when it was requested
    on_stored: OnStored | None = None  # called with the announced payload once the store took it
    prune: tuple[str, ...] = ()  # names in the store that this one replaces: deleted once it is stored


def _version(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _copy_hashing(src: BinaryIO, dst: BinaryIO | None) -> tuple[str, int]:
    # One reused buffer of L2 size: no 1 MB allocation per chunk (each one an mmap/munmap pair, and a munmap in a
    # threaded process interrupts the other cores, training included), and the data stays in cache between the
    # read, the hash and the write.
    h = hashlib.sha256()
    size = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while n := src.readinto(buf):  # type: ignore[attr-defined]
        chunk = view[:n]
        h.update(chunk)  # hashlib releases the GIL on large buffers: the training thread keeps running
        size += n
        if dst is not None:
            dst.write(chunk)
    return h.hexdigest(), size


class Store:
    """Where artifacts go.  The base class keeps them where they are (``uri`` = absolute path)."""

    needs_copy = False

    def put(self, staged: Path | None, source: Path, name: str, digest: str, epoch: int | None) -> str:
        """Store ``staged`` (the copy made while hashing, when :attr:`needs_copy`) and return its ``uri``."""
        return str(source)

    def staging(self, name: str) -> Path:
        """Where the copy of ``name`` is written while it is hashed (only when :attr:`needs_copy`)."""
        raise NotImplementedError

    def delete(self, name: str) -> None:
        """Remove ``name`` from the store (nothing to do when files stay where they are)."""


class DirStore(Store):
    """A local (or mounted) folder: ``<root>/<project>/<job_id>/<attempt>/<name>``."""

    needs_copy = True

    def __init__(self, root: Path, ctx: JobContext) -> None:
        self.folder = Path(root).resolve() / ctx.project / (ctx.job_id or "local") / str(ctx.attempt)

    def staging(self, name: str) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder / f".{name}.{os.getpid()}.tmp"

    def put(self, staged: Path | None, source: Path, name: str, digest: str, epoch: int | None) -> str:
        assert staged is not None
        dest = self.folder / name
        os.replace(staged, dest)
        return str(dest)

    def delete(self, name: str) -> None:
        (self.folder / name).unlink(missing_ok=True)


class S3Store(Store):
    """An S3-compatible bucket: ``s3://<bucket>/<prefix>/<project>/<job_id>/<attempt>/<name>``."""

    needs_copy = True

    def __init__(self, uri: str, ctx: JobContext, endpoint: str | None = None, region: str | None = None) -> None:
        if not uri.startswith("s3://") or len(uri) <= 5:
            raise ValueError(f"not an s3:// URI: {uri!r}")
        bucket, _, prefix = uri[5:].partition("/")
        self.bucket = bucket
        parts = [p for p in prefix.strip("/").split("/") if p] + [ctx.project, ctx.job_id or "local",
                                                                  str(ctx.attempt)]
        self.prefix = "/".join(parts)
        self.endpoint, self.region = endpoint, region or "us-east-1"
        self.stage_dir = ctx.job_dir.resolve() / ".kiln-staging"
        self.part_size = 64 << 20  # multipart above 128 MB (S3: parts of 5 MB to 5 GB, at most 10,000)
        self._client: Any = None
        # boto3's import needs this module, which cannot be imported once the interpreter is shutting down (the
        # last checkpoint is often uploaded from the atexit flush): import it now, it is cheap.
        import concurrent.futures.thread  # noqa: F401

    def staging(self, name: str) -> Path:
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        return self.stage_dir / f"{name}.{os.getpid()}.tmp"

    def client(self) -> Any:
        if self._client is None:
            import boto3  # lazily, on the worker thread: the import alone takes a while

            self._client = boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region)
        return self._client

    def put(self, staged: Path | None, source: Path, name: str, digest: str, epoch: int | None) -> str:
        # Plain PUT / sequential multipart, no s3transfer thread pool: this also runs at interpreter exit (the
        # last checkpoint, flushed by the atexit hook), when Python refuses to start new thread pools.
        assert staged is not None
        key = f"{self.prefix}/{name}"
        meta = {"Metadata": {"sha256": digest, "epoch": "" if epoch is None else str(epoch)}}
        client = self.client()
        try:
            with open(staged, "rb") as fh:
                if staged.stat().st_size <= 2 * self.part_size:
                    client.put_object(Bucket=self.bucket, Key=key, Body=fh, **meta)
                else:
                    self._multipart(client, key, fh, meta)
        finally:
            staged.unlink(missing_ok=True)
        return f"s3://{self.bucket}/{key}"

    def delete(self, name: str) -> None:
        self.client().delete_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}")

    def _multipart(self, client: Any, key: str, fh: BinaryIO, meta: dict[str, Any]) -> None:
        upload = client.create_multipart_upload(Bucket=self.bucket, Key=key, **meta)["UploadId"]
        try:
            parts = []
            while chunk := fh.read(self.part_size):
                n = len(parts) + 1
                etag = client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload, PartNumber=n, Body=chunk)
                parts.append({"ETag": etag["ETag"], "PartNumber": n})
            client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload,
                                             MultipartUpload={"Parts": parts})
        except BaseException:
            client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
            raise


def store_from_context(ctx: JobContext) -> Store:
    """The store the context asks for (S3 first, then a folder, else none); a bad setting falls back to none."""
    try:
        if ctx.artifact_s3_uri:
            return S3Store(ctx.artifact_s3_uri, ctx, ctx.artifact_s3_endpoint, ctx.artifact_s3_region)
        if ctx.artifact_dir:
            return DirStore(ctx.artifact_dir, ctx)
    except Exception as exc:  # noqa: BLE001
        warn_once("artifact-store", f"artifact store not usable ({exc!r}); artifacts stay where they are")
    return Store()


class ArtifactWorker:
    """The background thread behind :meth:`kiln_sdk.Run.artifact` (see the module docstring).

    Args:
        store: Where artifacts go.
        submit: Called with the ``artifact`` record once an artifact is stored (the run's reporter).
        retries: Store attempts per artifact before falling back to announcing the local path.
    """

    def __init__(self, store: Store, submit: Callable[[Record], None], retries: int = 3) -> None:
        self.store = store
        self.submit = submit
        self.retries = retries
        self._pending: dict[Path, _Request] = {}
        self._cv = threading.Condition()
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self.stored = 0
        self.superseded = 0
        self.failed = 0

    def add(self, path: str | os.PathLike[str], name: str | None = None, epoch: int | None = None,
            on_stored: OnStored | None = None, prune: tuple[str, ...] = ()) -> None:
        """Queue ``path`` (training thread: one ``stat``, no reading).

        ``on_stored`` is called (on the worker thread) with the announced payload once the store holds the file;
        ``prune`` names older artifacts of this attempt that it replaces, deleted from the store after that.
        """
        p = Path(path).resolve()
        try:
            version: tuple[int, int, int] | None = _version(p)
        except OSError as exc:
            warn_once(f"artifact:{p}", f"artifact {p} not reported: {exc!r}")
            return
        with self._cv:
            if self._closed:
                return
            if self._pending.pop(p, None) is not None:
                self.superseded += 1  # the older version is gone anyway: it was rewritten in place
            self._pending[p] = _Request(p, name or p.name, epoch, version, on_stored, tuple(prune))
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name="kiln-sdk-artifacts", daemon=True)
                start_thread(self._thread)
            self._cv.notify()

    def wait(self, timeout: float) -> bool:
        """Wait until every queued artifact is announced; True when they are."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def close(self, timeout: float) -> bool:
        """Finish the queued artifacts (bounded by ``timeout``), then accept no more."""
        ok = self.wait(timeout)
        with self._cv:
            self._closed = True
            if not ok and self._pending:
                warn_once("artifacts-left", f"{len(self._pending)} artifact(s) not stored in time: "
                                            f"{', '.join(str(p) for p in self._pending)}")
            self._cv.notify_all()
        return ok

    def _main(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if not self._pending:
                    return
                path = next(iter(self._pending))
                req = self._pending.pop(path)
                self._busy = True
            try:
                self._process(req)
            except Exception as exc:  # noqa: BLE001 - a worker bug must not stop later artifacts
                warn_once(f"artifact-bug:{type(exc).__name__}", f"artifact {req.path} failed: {exc!r}")
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _newer_queued(self, path: Path) -> bool:
        with self._cv:
            return path in self._pending

    def _read(self, req: _Request) -> tuple[str, int, Path | None] | None:
        """Hash (and copy when the store needs it) a consistent version of the file, or None when superseded."""
        for _ in range(5):
            staged = self.store.staging(req.name) if self.store.needs_copy else None
            try:
                before = _version(req.path)
                with open(req.path, "rb") as src:
                    if staged is None:
                        digest, size = _copy_hashing(src, None)
                    else:
                        with open(staged, "wb") as dst:
                            digest, size = _copy_hashing(src, dst)
                after = _version(req.path)
            except FileNotFoundError:
                if staged is not None:
                    staged.unlink(missing_ok=True)
                if self._newer_queued(req.path):
                    self.superseded += 1
                    return None
                raise
            if before == after and size == after[1]:
                return digest, size, staged
            if staged is not None:
                staged.unlink(missing_ok=True)
            if self._newer_queued(req.path):  # rewritten while read, and announced again: that one wins
                self.superseded += 1
                return None
            time.sleep(0.05)
        raise RuntimeError(f"{req.path} kept changing while it was read")

    def _process(self, req: _Request) -> None:
        try:
            got = self._read(req)
        except OSError as exc:
            warn_once(f"artifact:{req.path}", f"artifact {req.path} not reported: {exc!r}")
            return
        if got is None:
            return
        digest, size, staged = got
        uri = str(req.path)
        delay = 0.5
        stored = False
        for attempt in range(self.retries):
            try:
                uri = self.store.put(staged, req.path, req.name, digest, req.epoch)
                self.stored += 1
                stored = True
                break
            except Exception as exc:  # noqa: BLE001 - the store is down: retry, then announce the local file
                if attempt + 1 == self.retries:
                    self.failed += 1
                    warn_once(f"store:{type(exc).__name__}", f"storing {req.name} failed ({exc!r}); announcing "
                                                             f"the local file {req.path} instead")
                    if staged is not None:
                        staged.unlink(missing_ok=True)
                    break
                if staged is not None and not staged.exists():  # the store consumed it: make it again
                    got = self._read(req)
                    if got is None:
                        return
                    digest, size, staged = got
                time.sleep(delay)
                delay *= 2
        payload = {"name": req.name, "uri": uri, "size": size, "sha256": digest, "epoch": req.epoch}
        self.submit(("artifact", time.time(), payload))
        if stored and req.on_stored is not None:
            req.on_stored(dict(payload))
        for name in req.prune if stored else ():
            try:
                self.store.delete(name)
            except Exception as exc:  # noqa: BLE001 - a leftover file costs space, not correctness
                warn_once(f"prune:{type(exc).__name__}", f"could not delete the replaced artifact {name}: {exc!r}")
