"""The real trainer (``python -m kiln_trainer_ultralytics``) as the runner starts it, against real JetStream."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import nats
import pytest
from kiln_contracts import Event, JobSpec, StartJob, TrainArgs, streams, subjects

from kiln_local.synth import make_detection_dataset

PROJECT = "trainertest"


async def ensure(url: str) -> None:
    nc = await nats.connect(url)
    try:
        await streams.ensure_streams(nc.jetstream())
    finally:
        await nc.close()


async def fetch(url: str, subject: str) -> list[Event]:
    """Every event of ``subject`` in KILN_EVENTS, in stream order."""
    nc = await nats.connect(url)
    out: list[Event] = []
    try:
        sub = await nc.jetstream().pull_subscribe(subject, stream="KILN_EVENTS")
        total = (await sub.consumer_info()).num_pending  # everything stored now: read exactly that many
        while len(out) < total:
            out += [Event.model_validate_json(m.data) for m in await sub.fetch(min(500, total - len(out)), timeout=10)]
        await sub.unsubscribe()
    finally:
        await nc.close()
    return out


def run_trainer(tmp_path: Path, nats_url: str, dataset: Path, train: TrainArgs, timeout: float = 240,
                model: str = "yolov8n.yaml", cancel: bool = False, *, job_id: str | None = None, attempt: int = 1,
                env: dict[str, str] | None = None) -> tuple[str, subprocess.CompletedProcess[str]]:
    job_id = job_id or f"tr-{uuid.uuid4().hex[:10]}"
    job_dir = tmp_path / ("job" if attempt == 1 else f"job-{attempt}")
    job_dir.mkdir()
    if cancel:
        (job_dir / "cancel").touch()
    spec = StartJob(job_id=job_id, attempt=attempt,
                    spec=JobSpec(project=PROJECT, model=model, dataset=str(dataset), train=train))
    (job_dir / "start.json").write_text(spec.model_dump_json())
    env = {
        **os.environ, "KILN_JOB_ID": job_id, "KILN_PROJECT": PROJECT, "KILN_ATTEMPT": str(attempt),
        "KILN_NATS_URL": nats_url, "KILN_JOB_DIR": str(job_dir), "KILN_JOB_SPEC": str(job_dir / "start.json"),
        "KILN_DATASET": str(dataset), "OMP_NUM_THREADS": "2", **(env or {}),
    }
    proc = subprocess.run([sys.executable, "-m", "kiln_trainer_ultralytics"], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=job_dir, start_new_session=True)
    return job_id, proc


def kiln_line(stderr: str) -> str:
    """The trainer's last ``kiln: ...`` line (the SDK may add its own notes after it)."""
    return [line for line in stderr.splitlines() if line.startswith("kiln: ")][-1]


TINY = dict(epochs=2, imgsz=64, batch=8, nbs=8, warmup_epochs=0, workers=0, plots=False)


@pytest.mark.e2e
async def test_two_epochs_report_every_metric_once(nats_url: str, tmp_path: Path) -> None:
    await ensure(nats_url)
    data = make_detection_dataset(tmp_path / "data", n_train=16, n_val=8, imgsz=64)
    t0 = time.monotonic()
    job_id, proc = run_trainer(tmp_path, nats_url, data, TrainArgs(**TINY))
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kiln: versions " in proc.stdout and "ultralytics=" in proc.stdout

    events = await fetch(nats_url, subjects.job_events(job_id))
    epochs = [e.data for e in events if e.data.kind == "epoch"]
    assert [ep.epoch for ep in epochs] == [1, 2], "one EpochCompleted per epoch, no phantom final one"
    for ep in epochs:
        assert ep.epochs == 2 and ep.epoch_time and ep.epoch_time > 0
        for key in ("train/box_loss", "train/cls_loss", "metrics/mAP50(B)", "metrics/mAP50-95(B)", "lr/pg0",
                    "lr/pg1", "lr/pg2", "fitness"):
            assert key in ep.metrics, (key, sorted(ep.metrics))
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    artifacts = {e.data.name for e in events if e.data.kind == "artifact"}
    assert {"last.pt", "best.pt"} <= artifacts
    progress = [e.data for e in events if e.data.kind == "progress"]
    assert progress and progress[-1].batch == progress[-1].batches == 2
    finals = [e.data for e in events if e.data.kind == "metrics" and any(k.startswith("final/") for k in e.data.metrics)]
    assert len(finals) == 1 and finals[0].step == 2
    assert not (tmp_path / "job" / "spool" / "events.jsonl").exists()
    print(f"trainer wall time {wall:.1f}s, {len(events)} events")


@pytest.mark.e2e
async def test_cancel_file_stops_after_the_epoch_with_exit_3(nats_url: str, tmp_path: Path) -> None:
    await ensure(nats_url)
    data = make_detection_dataset(tmp_path / "data", n_train=16, n_val=8, imgsz=64)
    # The runner creates $KILN_JOB_DIR/cancel; here it is there from the start, as if it came during epoch 1.
    job_id, proc = run_trainer(tmp_path, nats_url, data, TrainArgs(**{**TINY, "epochs": 3}), cancel=True)
    assert proc.returncode == 3, proc.stderr[-3000:]
    events = await fetch(nats_url, subjects.job_events(job_id))
    assert [e.data.epoch for e in events if e.data.kind == "epoch"] == [1]
    assert "last.pt" in {e.data.name for e in events if e.data.kind == "artifact"}
    assert (tmp_path / "job" / "train" / "weights" / "last.pt").exists()


def test_missing_dataset_exits_2_with_the_reason(nats_url: str, tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "data.yaml"
    _, proc = run_trainer(tmp_path, nats_url, missing, TrainArgs(**TINY), timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"kiln: dataset not found: {missing}"


def test_missing_weights_exit_2_with_the_reason(nats_url: str, tmp_path: Path) -> None:
    data = make_detection_dataset(tmp_path / "data", n_train=2, n_val=1)
    _, proc = run_trainer(tmp_path, nats_url, data, TrainArgs(**TINY), timeout=60, model="/nowhere/best.pt")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "kiln: model not found: /nowhere/best.pt"


def test_dataset_ultralytics_rejects_exits_2_with_the_reason(nats_url: str, tmp_path: Path) -> None:
    data = tmp_path / "broken" / "data.yaml"
    data.parent.mkdir()
    data.write_text(f"path: {data.parent}\ntrain: images/train\nval: images/val\nnames: {{0: a}}\n")
    _, proc = run_trainer(tmp_path, nats_url, data, TrainArgs(**TINY), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = kiln_line(proc.stderr)
    assert last == f"kiln: dataset {data}: the 'train' split {data.parent / 'images' / 'train'} does not exist", last


DOWNLOAD_PAYLOADS = [
    "import pathlib; pathlib.Path({marker!r}).write_text('ran')",
    "bash -c touch${{IFS}}{marker}",
]


@pytest.mark.parametrize("payload", DOWNLOAD_PAYLOADS, ids=["python", "bash"])
def test_a_dataset_download_entry_never_runs(nats_url: str, tmp_path: Path, payload: str) -> None:
    """The payload that made Ultralytics exec() code on the runner: a `download:` entry and no val split."""
    marker = tmp_path / "pwned"
    data = tmp_path / "evil" / "data.yaml"
    (data.parent / "images" / "train").mkdir(parents=True)
    data.write_text("path: .\ntrain: images/train\nval: images/val\nnames: {0: a}\n"
                    f"download: {payload.format(marker=str(marker))!r}\n")
    _, proc = run_trainer(tmp_path, nats_url, data, TrainArgs(**TINY), timeout=120)
    assert not marker.exists(), "the dataset's download: entry ran on the runner"
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "'download:' entry is ignored" in proc.stdout
    last = kiln_line(proc.stderr)
    assert last == f"kiln: dataset {data}: the 'val' split {data.parent / 'images' / 'val'} does not exist", last



@pytest.mark.e2e
async def test_a_stopped_attempt_leaves_a_resumable_checkpoint_and_the_next_attempt_goes_on_from_it(
        nats_url: str, tmp_path: Path) -> None:
    """Ultralytics strips last.pt when a stopped training ends (epoch -1, no optimizer): the attempt that Kiln
    stops (cancel, hand-back) must leave a full-state copy in the artifact store, named in resume.json."""
    import hashlib
    import json

    import torch

    await ensure(nats_url)
    data = make_detection_dataset(tmp_path / "data", n_train=8, n_val=4, imgsz=64)
    store = tmp_path / "store"
    env = {"KILN_ARTIFACT_DIR": str(store), "KILN_CHECKPOINT_INTERVAL_S": "3600"}
    job_id, proc = run_trainer(tmp_path, nats_url, data, TrainArgs(**{**TINY, "epochs": 3}), cancel=True, env=env)
    assert proc.returncode == 3, proc.stderr[-3000:]
    record = json.loads((tmp_path / "job" / "resume.json").read_text())
    assert record["epoch"] == 1 and record["name"] == "resume-epoch1.pt"
    stored = Path(record["uri"])
    assert stored.is_relative_to(store) and hashlib.sha256(stored.read_bytes()).hexdigest() == record["sha256"]
    full = torch.load(stored, weights_only=False)
    assert full["epoch"] == 0 and full["optimizer"] is not None
    stripped = torch.load(tmp_path / "job" / "train" / "weights" / "last.pt", weights_only=False)
    assert stripped["epoch"] == -1  # what the next attempt used to resume from

    _, proc = run_trainer(tmp_path, nats_url, data, TrainArgs(**{**TINY, "epochs": 3}), job_id=job_id, attempt=2,
                          env={**env, "KILN_RESUME": str(stored)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = await fetch(nats_url, subjects.job_events(job_id))
    assert [(e.attempt, e.data.epoch) for e in events if e.data.kind == "epoch"] == [(1, 1), (2, 2), (2, 3)]


def test_a_model_yaml_cannot_run_code(nats_url: str, tmp_path: Path) -> None:
    """Ultralytics eval()s a model YAML's `activation:`; the trainer loads models in Ultralytics' safe mode."""
    import ultralytics

    marker = tmp_path / "pwned"
    base = Path(ultralytics.__file__).parent / "cfg" / "models" / "v8" / "yolov8.yaml"
    model = tmp_path / "evil.yaml"
    model.write_text(base.read_text() + f"\nactivation: __import__('pathlib').Path({str(marker)!r}).touch() or nn.SiLU()\n")
    data = make_detection_dataset(tmp_path / "data", n_train=2, n_val=1)
    _, proc = run_trainer(tmp_path, nats_url, data, TrainArgs(**TINY), timeout=120, model=str(model))
    assert not marker.exists(), "the model YAML's activation ran on the runner"
    assert proc.returncode != 0 and "unsupported activation" in proc.stdout + proc.stderr, proc.stderr[-2000:]
