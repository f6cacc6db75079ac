"""System metrics: sampled on a background thread, on by default inside Kiln, one sampling process per job."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kiln_sdk
from kiln_sdk import RecordingReporter
from kiln_sdk.system import OWNER_ENV, _Gpus, sample_once


@pytest.fixture(autouse=True)
def _no_owner(monkeypatch):
    monkeypatch.delenv(OWNER_ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)


def test_inside_kiln_the_run_reports_cpu_and_ram_every_interval(tmp_path: Path) -> None:
    rec = RecordingReporter(job_id="j1")
    run = kiln_sdk.init(reporter=rec, env={"KILN_JOB_ID": "j1", "KILN_JOB_DIR": str(tmp_path),
                                           "KILN_SYSTEM_METRICS_S": "0.1"})
    try:
        assert run.monitor is not None and run.monitor._thread.name == "kiln-sdk-system"
        assert os.environ[OWNER_ENV] == f"{os.getpid()}:j1:1"
        deadline = time.monotonic() + 10
        while len(rec.of_kind("metrics")) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        run.finish()
    samples = rec.of_kind("metrics")
    assert len(samples) >= 3
    keys = set(samples[0].metrics)
    assert {"sys/cpu_percent", "sys/ram_used_gb", "sys/ram_percent", "sys/proc_rss_gb"} <= keys
    assert 0 <= samples[-1].metrics["sys/cpu_percent"] <= 100 and samples[-1].metrics["sys/proc_rss_gb"] > 0
    assert [s.step for s in samples] == sorted(s.step for s in samples)  # seconds since the run started
    assert OWNER_ENV not in os.environ and not run.monitor._thread.is_alive()  # finish stops it


def test_off_outside_kiln_and_when_set_to_zero(tmp_path: Path) -> None:
    run = kiln_sdk.init(reporter=RecordingReporter(), env={})
    assert run.monitor is None
    run.finish()
    run = kiln_sdk.init(reporter=RecordingReporter(), env={"KILN_JOB_ID": "j1", "KILN_SYSTEM_METRICS_S": "0"})
    assert run.monitor is None
    run.finish()


def test_a_child_process_leaves_sampling_to_the_process_that_owns_it(tmp_path: Path) -> None:
    code = ("import kiln_sdk; from kiln_sdk import RecordingReporter; "
            "run = kiln_sdk.init(reporter=RecordingReporter()); print(run.monitor is not None); run.finish()")
    env = {**os.environ, "KILN_JOB_ID": "j1", "KILN_JOB_DIR": str(tmp_path), "KILN_SYSTEM_METRICS_S": "5"}
    alone = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    owned = subprocess.run([sys.executable, "-c", code], env={**env, OWNER_ENV: f"{os.getpid()}:j1:1"},
                           capture_output=True, text=True, timeout=60)  # e.g. a DDP worker of a sampling launcher
    assert (alone.stdout.strip(), owned.stdout.strip()) == ("True", "False"), alone.stderr + owned.stderr
    # An owner of another job, or a stale one without a job (a process that never finished its run), does not count.
    for stale in (f"{os.getpid()}:j2:1", f"{os.getpid()}:j1:2", str(os.getpid())):
        other = subprocess.run([sys.executable, "-c", code], env={**env, OWNER_ENV: stale}, capture_output=True,
                               text=True, timeout=60)
        assert other.stdout.strip() == "True", (stale, other.stderr)


def test_no_gpu_keys_when_the_job_has_no_gpu(monkeypatch) -> None:
    import psutil

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    gpus = _Gpus()
    assert gpus.handles == []
    assert not any(k.startswith("sys/gpu") for k in sample_once(psutil.Process(), gpus))


def test_gpu_keys_follow_cuda_visible_devices(monkeypatch) -> None:
    """No GPU on the test machines: a stand-in pynvml with 4 boards; the job sees boards 2 and 3, as cuda:0/1."""
    import types

    import psutil

    calls: list[object] = []
    nv = types.SimpleNamespace(
        NVML_TEMPERATURE_GPU=0,
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 4,
        nvmlDeviceGetHandleByIndex=lambda i: calls.append(i) or i,
        nvmlDeviceGetHandleByUUID=lambda u: calls.append(u) or 3,
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=10 * h),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=(h + 1) * 1024**3, total=80 * 1024**3),
        nvmlDeviceGetTemperature=lambda h, kind: 40 + h,
        nvmlDeviceGetPowerUsage=lambda h: (100 + h) * 1000,
    )
    monkeypatch.setitem(__import__("sys").modules, "pynvml", nv)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,GPU-abc")
    gpus = _Gpus()
    out = sample_once(psutil.Process(), gpus)
    assert calls == [2, "GPU-abc"]
    assert {k: v for k, v in out.items() if k.startswith("sys/gpu")} == {
        "sys/gpu0_util": 20.0, "sys/gpu0_mem_used_gb": 3.0, "sys/gpu0_mem_percent": 3.75, "sys/gpu0_temp_c": 42.0,
        "sys/gpu0_power_w": 102.0,
        "sys/gpu1_util": 30.0, "sys/gpu1_mem_used_gb": 4.0, "sys/gpu1_mem_percent": 5.0, "sys/gpu1_temp_c": 43.0,
        "sys/gpu1_power_w": 103.0,
    }


def test_a_run_shorter_than_one_interval_still_gets_one_sample(tmp_path: Path) -> None:
    rec = RecordingReporter(job_id="j1")
    run = kiln_sdk.init(reporter=rec, env={"KILN_JOB_ID": "j1", "KILN_JOB_DIR": str(tmp_path),
                                           "KILN_SYSTEM_METRICS_S": "60"})
    time.sleep(0.2)
    run.finish()
    samples = [m for m in rec.of_kind("metrics") if "sys/cpu_percent" in m.metrics]
    assert len(samples) == 1 and samples[0].metrics["sys/proc_rss_gb"] > 0
