"""Checkpoints stored in an S3-compatible store (moto's standalone server, a real HTTP endpoint) by the SDK's
background thread; the runner hands the store settings and explicit credentials to the trainer."""

from __future__ import annotations

import hashlib
import sys
import textwrap
import threading
import uuid

import nats
import pytest
from kiln_contracts import JobSpec, streams

from kiln_sdk import JobContext, RecordingReporter, Run
from kiln_testing.runners import EventLog, RunnerProc, publish_start


@pytest.fixture()
def bucket(s3) -> str:
    name = f"ckpt-{uuid.uuid4().hex[:8]}"
    s3.client().create_bucket(Bucket=name)
    return name


class ThreadRecorder(RecordingReporter):
    def __init__(self) -> None:
        super().__init__(job_id="j1", project="p1", attempt=2)
        self.threads: list[str] = []

    def submit(self, record) -> None:  # noqa: ANN001
        self.threads.append(threading.current_thread().name)
        super().submit(record)


def test_checkpoints_are_uploaded_with_their_hash_and_the_event_points_at_them(s3, bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    rec = ThreadRecorder()
    ctx = JobContext(job_id="j1", project="p1", attempt=2, job_dir=tmp_path, artifact_s3_uri=f"s3://{bucket}/runs/",
                     artifact_s3_endpoint=s3.url)
    run = Run(ctx, rec)
    ckpt = tmp_path / "weights" / "last.pt"
    ckpt.parent.mkdir()
    for epoch, size in ((1, 3 << 20), (2, 5 << 20)):
        ckpt.write_bytes(bytes([epoch]) * size)
        run.artifact(ckpt, epoch=epoch)
        assert run.flush(60)
    assert run.finish()

    key = "runs/p1/j1/2/last.pt"
    arts = rec.of_kind("artifact")
    assert [(a.uri, a.epoch, a.size) for a in arts] == [(f"s3://{bucket}/{key}", 1, 3 << 20),
                                                         (f"s3://{bucket}/{key}", 2, 5 << 20)]
    obj = s3.client().get_object(Bucket=bucket, Key=key)
    body = obj["Body"].read()
    assert body == ckpt.read_bytes()  # the newest version
    assert obj["Metadata"] == {"sha256": hashlib.sha256(body).hexdigest(), "epoch": "2"} and arts[1].sha256 == \
        hashlib.sha256(body).hexdigest()
    assert set(rec.threads) == {"kiln-sdk-artifacts"}, "uploads happen on the SDK's thread, not the caller's"
    assert not list((tmp_path / ".kiln-staging").glob("*")), "staging copies are removed"


TRAINER = textwrap.dedent("""
    import os, kiln_sdk
    from pathlib import Path
    run = kiln_sdk.init()
    ckpt = Path(os.environ["KILN_JOB_DIR"]) / "best.pt"
    ckpt.write_bytes(b"weights" * 1000)
    run.artifact(ckpt, epoch=1)
""")


async def test_the_runner_passes_the_store_and_its_credentials_to_the_trainer(nats_url, s3, bucket, tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "data.yaml").write_text("names: {0: a}\n")
    runner = RunnerProc(nats_url, tmp_path / "work", f"art-{uuid.uuid4().hex[:6]}", tmp_path / "fake.log",
                        trainer_cmd=[sys.executable, str(script)], artifact_s3_uri=f"s3://{bucket}/kiln",
                        artifact_s3_endpoint=s3.url,
                        trainer_env={"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}).wait_ready()
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await streams.ensure_streams(js)
        log = await EventLog().start(js)
        job_id = f"art-{uuid.uuid4().hex[:8]}"
        await publish_start(js, job_id, JobSpec.model_validate({"model": "yolov8n.yaml", "project": "arts",
                                                                "dataset": str(tmp_path / "ds")}))
        await log.wait(lambda: log.finished(job_id), timeout=60)
    finally:
        runner.stop()
        await nc.close()
    assert log.finished(job_id)[0].data.status == "completed", log.finished(job_id)[0].data.last_logs
    assert not any("kiln_sdk" in line for line in log.finished(job_id)[0].data.last_logs), \
        log.finished(job_id)[0].data.last_logs
    (art,) = [e.data for e in log.of(job_id, "artifact")]
    key = f"kiln/arts/{job_id}/1/best.pt"
    assert (art.name, art.uri, art.epoch) == ("best.pt", f"s3://{bucket}/{key}", 1)
    body = s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    assert body == b"weights" * 1000 and art.sha256 == hashlib.sha256(body).hexdigest()


def test_large_checkpoints_go_up_in_parts(s3, bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    from kiln_sdk.artifacts import ArtifactWorker, S3Store

    store = S3Store(f"s3://{bucket}", JobContext(job_id="j2", job_dir=tmp_path), endpoint=s3.url)
    store.part_size = 5 << 20  # S3's smallest part: a 12 MB file goes up in 3 parts
    records: list = []
    ckpt = tmp_path / "big.pt"
    ckpt.write_bytes(bytes(range(256)) * (12 << 12))
    worker = ArtifactWorker(store, records.append)
    worker.add(ckpt, epoch=7)
    assert worker.close(60)
    (rec,) = [r[2] for r in records]
    key = "default/j2/1/big.pt"
    assert rec["uri"] == f"s3://{bucket}/{key}"
    obj = s3.client().get_object(Bucket=bucket, Key=key)
    assert obj["Body"].read() == ckpt.read_bytes() and obj["ETag"].strip('"').endswith("-3")
    assert obj["Metadata"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest() == rec["sha256"]
