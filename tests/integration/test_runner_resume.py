"""A job goes on from its last stored checkpoint on another host: real runners (separate work folders, nothing
shared but NATS and an S3-compatible store), the real Ultralytics trainer, tiny real trainings.

Each case used to end ``failed``: a drained runner's next attempt resumed from the optimizer-stripped ``last.pt``
("start a new training without resuming"), a lost host's retry pointed at a path on the dead host ("model not
found"), and a frozen runner's retry raced the old trainer that was still rewriting ``last.pt``.
"""

from __future__ import annotations

import signal
import sys
import time

import nats
import pytest

from kiln_contracts import JobSpec, JobStatus, streams
from kiln_local.synth import make_detection_dataset
from kiln_testing.runners import EventLog, RunnerProc, publish_start

pytestmark = pytest.mark.e2e
TRAINER = [sys.executable, "-m", "kiln_trainer_ultralytics"]
BUCKET = "ckpt"
TRAIN = {"epochs": 12, "imgsz": 64, "batch": 8, "nbs": 8, "workers": 0, "warmup_epochs": 0, "plots": False,
         "close_mosaic": 0}


@pytest.fixture()
async def world(nats_server, tmp_path, s3, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")  # the runners' own credentials (they fetch checkpoints)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await streams.ensure_streams(js)
    log = await EventLog().start(js)
    procs: list[RunnerProc] = []

    def runner(name: str, **kw: object) -> RunnerProc:
        r = RunnerProc(nats_server.url, tmp_path / f"host-{name}", name, tmp_path / "unused.log", trainer_cmd=TRAINER,
                       artifact_s3_uri=f"s3://{BUCKET}/kiln", artifact_s3_endpoint=s3.url, lost_after_s=6,
                       reaper_lease_s=3, heartbeat_s=1, shutdown_grace_s=1, trainer_env={
                           "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                           "KILN_CHECKPOINT_INTERVAL_S": "0", "OMP_NUM_THREADS": "1"}, **kw)
        procs.append(r)
        return r

    data = make_detection_dataset(tmp_path / "data", n_train=16, n_val=4, imgsz=64)
    yield js, log, runner, data
    for r in procs:
        r.kill(signal.SIGCONT)
        r.kill(signal.SIGKILL)
        r.proc.wait()
    await nc.close()
    for obj in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        client.delete_object(Bucket=BUCKET, Key=obj["Key"])
    client.delete_bucket(Bucket=BUCKET)


def resume_stored(log: EventLog, job: str, epoch: int) -> bool:
    return any(e.data.name.startswith("resume-epoch") and (e.data.epoch or 0) >= epoch
               for e in log.of(job, "artifact"))


async def start_and_train(js, log: EventLog, runner, data, job: str, epochs_done: int = 2):
    """Runner a claims the job; returns once it has stored a resumable checkpoint of ``epochs_done`` epochs."""
    a = await runner("a").ready()
    await publish_start(js, job, JobSpec.model_validate({"model": "yolov8n.yaml", "dataset": str(data),
                                                         "train": TRAIN, "max_attempts": 2}))
    await log.wait(lambda: resume_stored(log, job, epochs_done), timeout=180)
    b = await runner("b").ready()
    return a, b


def assert_resumed(log: EventLog, job: str) -> None:
    fin = log.finished(job)
    assert [(e.attempt, e.data.status) for e in fin] == [(2, JobStatus.completed)], [
        (e.attempt, e.data.status, e.data.reason) for e in fin]
    queued = [e for e in log.of(job, "status") if e.attempt == 2 and e.data.status == JobStatus.queued][0]
    running = [e for e in log.of(job, "status") if e.attempt == 2 and e.data.status == JobStatus.running][0]
    assert running.data.runner == "b"
    resumed_from = running.data.details["resume_from"]
    assert resumed_from.startswith(f"s3://{BUCKET}/kiln/") and "/1/resume-epoch" in resumed_from, resumed_from
    epochs2 = [e.data.epoch for e in log.of(job, "epoch") if e.attempt == 2]
    last1 = int(resumed_from.rsplit("resume-epoch", 1)[1].removesuffix(".pt"))
    assert epochs2 == list(range(last1 + 1, TRAIN["epochs"] + 1)), (epochs2, last1)
    return queued


async def test_a_drained_runner_hands_back_and_the_next_attempt_resumes_and_completes(world):
    js, log, runner, data = world
    a, b = await start_and_train(js, log, runner, data, "drain")
    a.kill(signal.SIGTERM)  # drain: the trainer stops at a batch boundary and stores its full state
    await log.wait(lambda: log.finished("drain"), timeout=240)
    queued = assert_resumed(log, "drain")
    assert "shut down" in queued.data.reason


async def test_a_lost_host_is_retried_on_another_host_from_the_stored_checkpoint(world):
    js, log, runner, data = world
    a, b = await start_and_train(js, log, runner, data, "lost")
    a.kill(signal.SIGKILL)  # the host is gone, and its disk with it
    t0 = time.monotonic()
    await log.wait(lambda: any(e.attempt == 2 for e in log.of("lost", "status")), timeout=60)
    detect = time.monotonic() - t0
    await log.wait(lambda: log.finished("lost"), timeout=240)
    queued = assert_resumed(log, "lost")
    assert "stopped sending heartbeats" in queued.data.reason and "from epoch" in queued.data.reason
    print(f"lost host: retry queued {detect:.1f}s after the kill")


async def test_a_frozen_runner_cannot_spoil_its_retry(world):
    js, log, runner, data = world
    a, b = await start_and_train(js, log, runner, data, "frozen")
    a.kill(signal.SIGSTOP)  # frozen past the lost-after bound; its trainer trains on and stores more checkpoints
    await log.wait(lambda: any(e.attempt == 2 and e.data.kind == "status" and e.data.status == JobStatus.running
                               for e in log.of("frozen")), timeout=60)
    a.kill(signal.SIGCONT)  # it wakes up fenced: it stops its trainer and reports nothing terminal
    await log.wait(lambda: log.finished("frozen"), timeout=240)
    assert_resumed(log, "frozen")
    assert a.proc.poll() is None  # the old runner lives on, serving other jobs
