"""The trainer checks the data roots again (defence in depth): the real ``python -m kiln_trainer_ultralytics``, with
``KILN_DATA_ROOTS`` as its runner sets it, refuses before Ultralytics opens anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import nats
import pytest

from kiln_contracts import JobSpec, StartJob, TrainArgs, streams
from kiln_local.synth import make_detection_dataset
from kiln_testing.runners import evil_pt

TINY = TrainArgs(epochs=1, imgsz=64, batch=8, nbs=8, warmup_epochs=0, workers=0, plots=False)


@pytest.fixture()
async def bus_url(nats_url: str) -> str:
    nc = await nats.connect(nats_url)
    try:
        await streams.ensure_streams(nc.jetstream())
    finally:
        await nc.close()
    return nats_url


@pytest.fixture()
def world(tmp_path):
    root, out = tmp_path / "root", tmp_path / "out"
    return root, out, make_detection_dataset(root / "ds", n_train=2, n_val=1)


def run_trainer(tmp_path: Path, nats_url: str, roots: list[Path], dataset: Path, model: str = "yolov8n.yaml",
                **env: str) -> subprocess.CompletedProcess[str]:
    job_id = f"paths-{uuid.uuid4().hex[:8]}"
    job_dir = tmp_path / "jobs" / job_id
    job_dir.mkdir(parents=True)
    cmd = StartJob(job_id=job_id, spec=JobSpec(model=model, dataset=str(dataset), train=TINY))
    (job_dir / "job.json").write_text(cmd.model_dump_json())
    full = {**os.environ, "KILN_JOB_ID": job_id, "KILN_PROJECT": "default", "KILN_ATTEMPT": "1",
            "KILN_NATS_URL": nats_url, "KILN_JOB_DIR": str(job_dir), "KILN_JOB_SPEC": str(job_dir / "job.json"),
            "KILN_DATASET": str(dataset), "KILN_DATA_ROOTS": json.dumps([str(r) for r in roots]),
            "OMP_NUM_THREADS": "2", **env}
    return subprocess.run([sys.executable, "-m", "kiln_trainer_ultralytics"], env=full, capture_output=True,
                          text=True, timeout=180, cwd=job_dir, start_new_session=True)


def kiln_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.startswith("kiln: ")][-1]


def test_the_trainer_refuses_a_pt_outside_its_roots_before_loading_it(bus_url, world, tmp_path):
    root, out, data = world
    marker = tmp_path / "pwned"
    evil = evil_pt(out / "evil.pt", marker)
    for model, env in ((str(evil), {}), ("yolov8n.yaml", {"KILN_MODEL": str(evil)})):
        proc = run_trainer(tmp_path, bus_url, [root], data, model, **env)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert kiln_line(proc.stderr) == (f"kiln: model {evil} is outside the runner's data roots ({root.resolve()}): "
                                          "a job may only read files under them (KILN_RUNNER_DATA_ROOTS)")
        assert "kiln: versions" not in proc.stdout  # refused before Ultralytics was even imported
    assert not marker.exists()


def test_the_trainer_refuses_a_data_yaml_that_names_files_outside_its_roots(bus_url, world, tmp_path):
    root, out, data = world
    elsewhere = make_detection_dataset(out / "ds", n_train=2, n_val=1)
    data.write_text(data.read_text().replace("train: images/train", f"train: {elsewhere.parent / 'images/train'}"))
    proc = run_trainer(tmp_path, bus_url, [root], data)
    assert proc.returncode == 2, proc.stderr[-2000:]
    outside = elsewhere.parent / "images" / "train"
    assert kiln_line(proc.stderr).startswith(f"kiln: the 'train:' entry of dataset {data.resolve()} ({outside}) "
                                             "is outside the runner's data roots")
    assert not list((tmp_path / "jobs").glob("*/dataset/data.yaml"))  # no checked copy was written


def test_the_trainer_loads_the_pt_its_runner_checked_and_still_loads_it_safely(bus_url, world, tmp_path):
    """``KILN_MODEL`` (the runner resolved the job's relative path from its own working folder) is what is loaded;
    inside the roots the path rule lets it through, and Ultralytics' safe load still never unpickles code."""
    root, _, data = world
    marker = tmp_path / "pwned"
    evil = evil_pt(root / "models" / "evil.pt", marker)
    proc = run_trainer(tmp_path, bus_url, [root], data, "models/evil.pt", KILN_MODEL=str(evil))
    assert proc.returncode != 0 and "data roots" not in proc.stderr, proc.stderr[-2000:]
    assert "kiln: versions" in proc.stdout  # it got as far as Ultralytics
    assert not marker.exists()
