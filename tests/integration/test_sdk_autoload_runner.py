"""An unmodified Ultralytics script run by a real runner reports through Kiln: the runner's PYTHONPATH hook
(kiln_sdk.integrations.ultralytics_autoload) registers the callbacks; a classification run, against real JetStream."""

from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path

import nats
import pytest
from kiln_contracts import JobSpec, streams

from kiln_local.synth import make_classification_dataset
from kiln_testing.runners import EventLog, RunnerProc, publish_start

USER_SCRIPT = textwrap.dedent("""
    # A user's script: nothing about Kiln in it.
    import os
    os.environ.update(YOLO_OFFLINE="1", YOLO_AUTOINSTALL="0", YOLO_CONFIG_DIR=os.path.join(os.getcwd(), "cfg"))
    from ultralytics import YOLO
    from ultralytics.utils import SETTINGS
    SETTINGS.update({"clearml": False, "tensorboard": False})
    YOLO("yolov8n-cls.yaml").train(data=os.environ["KILN_DATASET"], epochs=2, imgsz=32, batch=8, nbs=8, workers=0,
                                   plots=False, device="cpu", project=os.getcwd(), name="train", exist_ok=True)
""")


@pytest.mark.e2e
async def test_unmodified_classify_script_reports_epochs_artifacts_and_system_metrics(nats_url, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    script = tmp_path / "train.py"
    script.write_text(USER_SCRIPT)
    data = make_classification_dataset(tmp_path / "data", n_train=16, n_val=8)
    font = Path(__import__("matplotlib").get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    runner = RunnerProc(nats_url, tmp_path / "work", f"auto-{uuid.uuid4().hex[:6]}", tmp_path / "fake.log",
                        trainer_cmd=[sys.executable, str(script)],
                        trainer_env={"KILN_SYSTEM_METRICS_S": "1"}).wait_ready()
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await streams.ensure_streams(js)
        log = await EventLog().start(js)
        job_id = f"auto-{uuid.uuid4().hex[:8]}"
        job_dir = tmp_path / "work" / runner.name / "jobs" / f"{job_id}-1"
        (job_dir / "cfg" / "Ultralytics").mkdir(parents=True)  # the offline font (docs: OFFLINE-NOTES)
        (job_dir / "cfg" / "Ultralytics" / "Arial.ttf").write_bytes(font.read_bytes())
        await publish_start(js, job_id, JobSpec.model_validate(
            {"model": "yolov8n-cls.yaml", "task": "classify", "dataset": str(data), "project": "auto"}))
        await log.wait(lambda: log.finished(job_id), timeout=240)
    finally:
        runner.stop()
        await nc.close()

    finished = log.finished(job_id)[0].data
    assert finished.status == "completed", finished.last_logs
    trainer = [e for e in log.of(job_id) if e.source == "trainer"]
    epochs = [e.data for e in trainer if e.data.kind == "epoch"]
    assert [ep.epoch for ep in epochs] == [1, 2]
    for key in ("train/loss", "val/loss", "metrics/accuracy_top1", "metrics/accuracy_top5", "lr/pg0", "fitness"):
        assert key in epochs[0].metrics, (key, sorted(epochs[0].metrics))
    assert {"last.pt", "best.pt"} <= {e.data.name for e in trainer if e.data.kind == "artifact"}
    system = [e.data for e in trainer if e.data.kind == "metrics" and "sys/cpu_percent" in e.data.metrics]
    assert system and "sys/ram_used_gb" in system[0].metrics
