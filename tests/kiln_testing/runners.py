"""Runner processes and bus helpers for runner tests."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

from nats.js import JetStreamContext

from kiln_contracts import Event, JobSpec, StartJob, streams

FAKE_TRAINER = str(Path(__file__).resolve().parents[1] / "fixtures" / "fake_trainer.py")


class RunnerProc:
    """A real `python -m kiln_runner` process with a fake (or real) trainer.

    ``data_roots``: where its jobs may read datasets and model files; by default the parent of ``work``, the test's
    own temporary folder, where every test keeps its datasets.
    """

    def __init__(self, nats_url: str, work: Path, name: str, fake_log: Path, *, slots: int = 1, pool: str = "default",
                 trainer_cmd: list[str] | None = None, data_roots: list[Path] | None = None,
                 **settings: object) -> None:
        self.name = name
        roots = [work.parent] if data_roots is None else data_roots
        env = {**os.environ, "FAKE_LOG": str(fake_log), "KILN_RUNNER_NATS_URL": nats_url,
               "KILN_RUNNER_WORK_DIR": str(work / name), "KILN_RUNNER_RUNNER_ID": name,
               "KILN_RUNNER_SLOTS": str(slots), "KILN_RUNNER_POOL": pool,
               "KILN_RUNNER_DATA_ROOTS": json.dumps([str(r) for r in roots]),
               "KILN_RUNNER_TRAINER_CMD": json.dumps(trainer_cmd or [sys.executable, FAKE_TRAINER])}
        for k, v in settings.items():
            env[f"KILN_RUNNER_{k.upper()}"] = v if isinstance(v, str) else json.dumps(v)
        self.log_path = work / f"{name}.log"
        work.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "kiln_runner"], env=env, stdout=open(self.log_path, "wb"),
                                     stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 20) -> "RunnerProc":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b"up: pool" in self.log_path.read_bytes():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"runner {self.name} exited:\n{self.log_path.read_text()}")
            time.sleep(0.05)
        raise RuntimeError(f"runner {self.name} not ready:\n{self.log_path.read_text()}")

    async def ready(self, timeout: float = 20) -> "RunnerProc":
        """``wait_ready`` that lets the test's event loop run meanwhile (a proxy in it, for instance)."""
        deadline = time.monotonic() + timeout
        while b"up: pool" not in self.log_path.read_bytes():
            if self.proc.poll() is not None:
                raise RuntimeError(f"runner {self.name} exited:\n{self.log_path.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"runner {self.name} not ready:\n{self.log_path.read_text()}")
            await asyncio.sleep(0.05)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def spec(dataset: str, seconds: float = 1.0, **kw: object) -> JobSpec:
    return JobSpec.model_validate({"model": "yolov8n.yaml", "dataset": dataset,
                                   "train": {"epochs": max(1, int(seconds * 2))}, **kw})


async def publish_start(js: JetStreamContext, job_id: str, job_spec: JobSpec, *, attempt: int = 1,
                        msg_id: str | None = None) -> StartJob:
    cmd = StartJob(job_id=job_id, attempt=attempt, spec=job_spec)
    await js.publish(cmd.subject, cmd.model_dump_json().encode(), headers={"Nats-Msg-Id": msg_id or cmd.msg_id})
    return cmd


class EventLog:
    """Collects every job event from KILN_EVENTS (ordered push consumer from the start)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def start(self, js: JetStreamContext) -> "EventLog":
        async def cb(msg):  # type: ignore[no-untyped-def]
            self.events.append(Event.model_validate_json(msg.data))

        await streams.ensure_streams(js)
        self.sub = await js.subscribe("kiln.evt.>", cb=cb, ordered_consumer=True)
        return self

    def of(self, job_id: str, kind: str | None = None) -> list[Event]:
        return [e for e in self.events if e.job_id == job_id and (kind is None or e.data.kind == kind)]

    def finished(self, job_id: str) -> list[Event]:
        return self.of(job_id, "finished")

    async def wait(self, pred, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"condition not met within {timeout}s; events: "
                             f"{[(e.job_id, e.attempt, e.data.kind, getattr(e.data, 'status', '')) for e in self.events]}")


def read_fake_log(path: Path) -> list[tuple[str, str, int, int, float]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        what, job, attempt, pid, t = line.split()
        out.append((what, job, int(attempt), int(pid), float(t)))
    return out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


class _Payload:
    """Unpickling it opens (creates) ``marker``: what loading an untrusted ``.pt`` can do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.marker, "w"))


def evil_pt(path: Path, marker: Path) -> Path:
    """A ``.pt`` whose loading (plain pickle, or ``torch.load`` without ``weights_only``) creates ``marker``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    return path
