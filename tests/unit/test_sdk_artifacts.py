"""Artifacts: hashed, stored (local folder) and announced from a background thread; rewrites supersede."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

from kiln_sdk import JobContext, RecordingReporter, Run
from kiln_sdk.artifacts import ArtifactWorker, DirStore, Store


class ThreadRecorder(RecordingReporter):
    """Also remembers which thread submitted each record."""

    def __init__(self) -> None:
        super().__init__(job_id="j1", project="p1", attempt=2)
        self.threads: list[str] = []

    def submit(self, record) -> None:  # noqa: ANN001
        self.threads.append(threading.current_thread().name)
        super().submit(record)


def test_artifact_is_copied_to_the_folder_off_the_training_thread(tmp_path: Path) -> None:
    ckpt = tmp_path / "job" / "last.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"w" * (8 << 20))  # 8 MB: hashing it would show on the calling thread
    rec = ThreadRecorder()
    run = Run(JobContext(job_id="j1", project="p1", attempt=2, job_dir=tmp_path / "job",
                         artifact_dir=tmp_path / "store"), rec)
    t0 = time.perf_counter()
    run.artifact(ckpt, epoch=3)
    called = time.perf_counter() - t0
    assert run.flush(10)
    (art,) = rec.of_kind("artifact")
    dest = tmp_path / "store" / "p1" / "j1" / "2" / "last.pt"
    assert (art.name, art.uri, art.size, art.epoch) == ("last.pt", str(dest.resolve()), 8 << 20, 3)
    assert art.sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest() == hashlib.sha256(dest.read_bytes()).hexdigest()
    assert rec.threads == ["kiln-sdk-artifacts"]
    assert called < 0.05, f"run.artifact took {called * 1000:.1f} ms on the calling thread"
    assert not list(dest.parent.glob(".*.tmp")), "no temporary file left behind"
    assert run.finish()


def test_without_a_store_the_uri_is_the_file_itself(tmp_path: Path) -> None:
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"best")
    rec = RecordingReporter()
    run = Run(JobContext(job_id="j1", job_dir=tmp_path), rec)
    run.artifact(ckpt, name="model.pt")
    assert run.finish()  # finish waits for the queued artifacts
    (art,) = rec.of_kind("artifact")
    assert (art.name, art.uri, art.sha256) == ("model.pt", str(ckpt.resolve()), hashlib.sha256(b"best").hexdigest())


class SlowStore(DirStore):
    """Blocks in put() until released, so that requests pile up behind it."""

    def __init__(self, root: Path, ctx: JobContext) -> None:
        super().__init__(root, ctx)
        self.release = threading.Event()

    def put(self, staged, source, name, digest, epoch):  # noqa: ANN001
        self.release.wait(10)
        return super().put(staged, source, name, digest, epoch)


def test_a_file_rewritten_while_the_worker_is_busy_is_stored_once_in_its_newest_version(tmp_path: Path) -> None:
    ctx = JobContext(job_id="j1", job_dir=tmp_path)
    store = SlowStore(tmp_path / "store", ctx)
    records: list = []
    worker = ArtifactWorker(store, records.append)
    first, last = tmp_path / "first.pt", tmp_path / "last.pt"
    first.write_bytes(b"first")
    worker.add(first, epoch=1)  # the worker takes it and blocks in put()
    for epoch in (1, 2, 3):
        last.write_bytes(b"last%d" % epoch)
        worker.add(last, epoch=epoch)
    store.release.set()
    assert worker.close(10)
    got = [(r[2]["name"], r[2]["epoch"], r[2]["sha256"]) for r in records]
    assert got[0][:2] == ("first.pt", 1)
    assert got[1:] == [("last.pt", 3, hashlib.sha256(b"last3").hexdigest())]
    assert worker.superseded >= 2


class FailingStore(Store):
    needs_copy = False

    def put(self, staged, source, name, digest, epoch):  # noqa: ANN001
        raise ConnectionError("store down")


def test_a_failing_store_still_announces_the_local_file(tmp_path: Path, capsys) -> None:
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(b"x")
    records: list = []
    worker = ArtifactWorker(FailingStore(), records.append, retries=2)
    worker.add(ckpt, epoch=1)
    assert worker.close(10)
    assert [(r[2]["uri"], r[2]["epoch"]) for r in records] == [(str(ckpt.resolve()), 1)]
    assert worker.failed == 1 and "store down" in capsys.readouterr().err


def test_a_missing_file_is_reported_on_stderr_not_raised(tmp_path: Path, capsys) -> None:
    rec = RecordingReporter()
    run = Run(JobContext(job_id="j1", job_dir=tmp_path), rec)
    run.artifact(tmp_path / "nope.pt")
    assert run.finish() and rec.events == []
    assert "nope.pt" in capsys.readouterr().err
