"""Faults around a training run, on real parts: a private nats-server that goes away, a real runner and
metrics-writer (subprocesses), SQLite, a real YOLO training or a kiln_sdk script that gets SIGKILLed.

What must hold: every event the trainer reported reaches the database exactly once, in order, and the runner and
the writer survive the outage.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import nats
import pytest
from kiln_contracts import Event, JobSpec, streams, subjects

from kiln_local.synth import make_detection_dataset
from kiln_testing.runners import RunnerProc, publish_start

PROJECT = "faults"


class WriterProc:
    """``python -m kiln_metrics_writer`` on SQLite."""

    def __init__(self, nats_url: str, db: Path, log: Path) -> None:
        env = {**os.environ, "KILN_WRITER_NATS_URL": nats_url, "KILN_WRITER_DATABASE_URL": f"sqlite+aiosqlite:///{db}"}
        self.proc = subprocess.Popen([sys.executable, "-m", "kiln_metrics_writer"], env=env,
                                     stdout=open(log, "wb"), stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def query(db: Path, sql: str, *args: object) -> list[tuple]:
    if not db.exists():
        return []
    con = sqlite3.connect(db, timeout=10)
    try:
        return con.execute(sql, args).fetchall()
    except sqlite3.OperationalError:  # schema not there yet
        return []
    finally:
        con.close()


def wait_until(pred, timeout: float, what: str, poll: float = 0.2) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


async def ensure(url: str) -> None:
    nc = await nats.connect(url)
    try:
        await streams.ensure_streams(nc.jetstream())
    finally:
        await nc.close()


async def start_job(url: str, job_id: str, spec: JobSpec) -> None:
    nc = await nats.connect(url)
    try:
        await publish_start(nc.jetstream(), job_id, spec)
    finally:
        await nc.close()


async def stream_events(url: str, job_id: str, logs: bool = False) -> list[Event]:
    """Every event of the job in KILN_EVENTS (or its log batches in KILN_LOGS), in stream order."""
    nc = await nats.connect(url)
    out: list[Event] = []
    subject, stream = (subjects.job_logs(job_id), "KILN_LOGS") if logs else (subjects.job_events(job_id), "KILN_EVENTS")
    try:
        sub = await nc.jetstream().pull_subscribe(subject, stream=stream)
        total = (await sub.consumer_info()).num_pending
        while len(out) < total:
            msgs = await sub.fetch(min(500, total - len(out)), timeout=10)
            out += [Event.model_validate_json(m.data) for m in msgs]
            for m in msgs:  # beyond max_ack_pending the server would stop delivering
                await m.ack()
        await sub.unsubscribe()
    finally:
        await nc.close()
    return out


def _per_event_table(db: Path) -> bool:
    """The writer stores one row per metric event (``metric_events``) or, in the first schema, one per point."""
    return bool(query(db, "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'metric_events'"))


def epoch_rows(db: Path, job_id: str) -> list[tuple[int, int, int]]:
    """``(epoch, events stored for it, metric keys per event)`` in epoch order, whatever the writer's schema."""
    if _per_event_table(db):
        return query(db, 'SELECT m.step, COUNT(DISTINCT m.event_id), COUNT(*) / COUNT(DISTINCT m.event_id) '
                         'FROM metric_events AS m CROSS JOIN json_each(m."values") '
                         "WHERE m.job_id = ? AND m.kind = 'epoch' GROUP BY m.step ORDER BY m.step", job_id)
    return query(db, "SELECT step, COUNT(DISTINCT event_id), COUNT(*) / COUNT(DISTINCT event_id) FROM metrics "
                     "WHERE job_id = ? AND kind = 'epoch' GROUP BY step ORDER BY step", job_id)


def steps_of_key(db: Path, job_id: str, key: str) -> list[int]:
    """Steps of every stored point of ``key`` (one per event; a duplicate event would show twice)."""
    if _per_event_table(db):
        rows = query(db, 'SELECT step FROM metric_events WHERE job_id = ? AND json_extract("values", ?) IS NOT NULL '
                         "ORDER BY step", job_id, f'$."{key}"')
    else:
        rows = query(db, "SELECT step FROM metrics WHERE job_id = ? AND key = ? ORDER BY step", job_id, key)
    return [step for (step,) in rows]


def final_status(db: Path, job_id: str) -> str | None:
    rows = query(db, "SELECT status FROM job_status WHERE job_id = ?", job_id)
    return rows[0][0] if rows else None


@pytest.fixture()
def stack(nats_server, tmp_path: Path, monkeypatch):  # type: ignore[no-untyped-def]
    """A runner (real trainer command chosen per test) and a metrics-writer on the private nats-server."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    asyncio.run(ensure(nats_server.url))
    db = tmp_path / "kiln.db"
    writer = WriterProc(nats_server.url, db, tmp_path / "writer.log")
    procs: list[RunnerProc] = []

    def runner(trainer_cmd: list[str], **settings: object) -> RunnerProc:
        r = RunnerProc(nats_server.url, tmp_path / "work", "r1", tmp_path / "fake.log", trainer_cmd=trainer_cmd,
                       **settings).wait_ready()
        procs.append(r)
        return r

    yield db, runner, writer
    for r in procs:
        r.stop()
    writer.stop()


@pytest.mark.e2e
def test_nats_away_for_10s_mid_training_every_epoch_reaches_the_db_once_in_order(nats_server, stack, tmp_path):
    db, runner, writer = stack
    epochs = 6
    # Epochs of a few seconds here (imgsz 160), so that training goes on after NATS is back; the test prints how many
    # epochs did (on a much faster machine the run may end during the outage, which must hold just as well).
    data = make_detection_dataset(tmp_path / "data", n_train=32, n_val=8, imgsz=160)
    r = runner([sys.executable, "-m", "kiln_trainer_ultralytics"])
    job_id = f"outage-{uuid.uuid4().hex[:8]}"
    spec = JobSpec(project=PROJECT, model="yolov8n.yaml", dataset=str(data),
                   train={"epochs": epochs, "imgsz": 160, "batch": 8, "nbs": 8, "warmup_epochs": 0, "workers": 0,
                          "plots": False, "seed": 0})
    asyncio.run(start_job(nats_server.url, job_id, spec))

    first_save = tmp_path / "work" / "r1" / "jobs" / f"{job_id}-1" / "train" / "weights" / "last.pt"
    wait_until(first_save.exists, 180, "the end of epoch 1")
    nats_server.stop()  # everything loses the bus: trainer SDK, runner, writer
    t_down = time.monotonic()
    time.sleep(10)
    nats_server.start()
    outage, t_up = time.monotonic() - t_down, time.time()

    wait_until(lambda: final_status(db, job_id) in ("completed", "failed", "lost", "cancelled"), 240, "the job's end")
    assert final_status(db, job_id) == "completed", r.log_path.read_text()[-3000:]
    wait_until(lambda: len(epoch_rows(db, job_id)) == epochs, 30, "every epoch in the database")

    # Exactly once: one stored event per epoch, with all its metrics.
    per_epoch = epoch_rows(db, job_id)
    assert [row[0] for row in per_epoch] == list(range(1, epochs + 1))
    for step, events, keys in per_epoch:
        assert events == 1 and keys >= 8, (step, events, keys)

    # In order: the trainer's events carry gap-free seqs (events and log batches together), each stream stores
    # them in that order, none twice; the epochs among them too.
    events = asyncio.run(stream_events(nats_server.url, job_id))
    trainer = [e for e in events if e.source == "trainer"]
    trainer_logs = [e for e in asyncio.run(stream_events(nats_server.url, job_id, logs=True)) if e.source == "trainer"]
    for part in (trainer, trainer_logs):
        assert [e.seq for e in part] == sorted({e.seq for e in part}), "stored in seq order, none twice"
    assert sorted(e.seq for e in trainer + trainer_logs) == list(range(1, len(trainer) + len(trainer_logs) + 1))
    assert [e.data.epoch for e in trainer if e.data.kind == "epoch"] == list(range(1, epochs + 1))
    assert len({e.id for e in events}) == len(events)

    # The outage really hit the run: the SDK said it spooled (its stderr reaches the logs through the runner).
    logs = " ".join(t for (t,) in query(db, "SELECT text FROM logs WHERE job_id = ?", job_id))
    assert "kiln_sdk: NATS" in logs and "events go to" in logs, logs[-2000:]
    assert r.proc.poll() is None and writer.proc.poll() is None, "runner and writer survive the outage"
    after = sum(e.time.timestamp() > t_up for e in trainer if e.data.kind == "epoch")
    print("epoch ends relative to the restart:", [round(e.time.timestamp() - t_up, 1) for e in trainer
                                                  if e.data.kind == "epoch"])
    print(f"outage {outage:.1f}s; {len(events)} events, {len(trainer)} from the trainer; {after} epoch(s) ended "
          "after NATS was back")


KILLED_TRAINER = textwrap.dedent("""
    import os, sys, time, kiln_sdk
    from pathlib import Path
    job = Path(os.environ["KILN_JOB_DIR"])
    run = kiln_sdk.init()
    n = int(os.environ["ACKED"])
    for i in range(n):
        kiln_sdk.log_metrics(i, {"loss": float(i)})
    assert run.flush(30), run.reporter.stats
    (job.parent.parent / "acked").write_text(str(os.getpid()))
    while run.reporter.stats["connected"]:  # the test stops NATS now
        time.sleep(0.05)
    for i in range(n, 2 * n):
        kiln_sdk.log_metrics(i, {"loss": float(i)})
    while run.reporter.stats["spooled"] < n:
        time.sleep(0.05)
    (job.parent.parent / "spooled").write_text(str(os.getpid()))
    time.sleep(600)  # SIGKILLed here: no flush, no atexit
""")


def test_trainer_sigkilled_acked_events_stay_and_spooled_ones_are_replayed_by_the_runner(nats_server, stack,
                                                                                            tmp_path):
    db, runner, writer = stack
    script = tmp_path / "killed_trainer.py"
    script.write_text(KILLED_TRAINER)
    n = 300
    # trainer_env: the runner passes it to the trainer explicitly (system metrics off: only our events).
    r = runner([sys.executable, str(script)], trainer_env={"ACKED": str(n), "KILN_SYSTEM_METRICS_S": "0"},
               heartbeat_s=1.0)
    job_id = f"killed-{uuid.uuid4().hex[:8]}"
    marks = tmp_path / "work"  # the script writes its marks two levels above its job folder (work/r1/jobs/<job>)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "data.yaml").write_text("names: {0: a}\n")  # the runner checks the dataset exists
    asyncio.run(start_job(nats_server.url, job_id, JobSpec(project=PROJECT, model="yolov8n.yaml",
                                                            dataset=str(tmp_path / "ds"))))

    def acked() -> bool:
        assert final_status(db, job_id) in (None, "queued", "starting", "running"), r.log_path.read_text()[-2000:]
        return (marks / "r1" / "acked").exists()

    wait_until(acked, 60, "the first events acknowledged")
    wait_until(lambda: len(steps_of_key(db, job_id, "loss")) == n, 30, "the acknowledged events in the database")
    nats_server.stop()
    wait_until(lambda: (marks / "r1" / "spooled").exists(), 30, "the next events spooled")
    pid = int((marks / "r1" / "spooled").read_text())
    os.kill(pid, signal.SIGKILL)
    time.sleep(2)  # the runner sees the exit while NATS is still away: its replay has to wait for it
    nats_server.start()

    wait_until(lambda: final_status(db, job_id) is not None and final_status(db, job_id) != "running", 90,
               "the job's end")
    wait_until(lambda: len(steps_of_key(db, job_id, "loss")) >= 2 * n, 30, "the replayed events in the database")
    assert steps_of_key(db, job_id, "loss") == list(range(2 * n)), "each event exactly once"
    assert final_status(db, job_id) == "failed"  # killed by a signal

    events = asyncio.run(stream_events(nats_server.url, job_id))
    trainer = [e for e in events if e.source == "trainer"]
    assert [e.seq for e in trainer] == list(range(1, 2 * n + 1)), "stored in seq order, none twice"  # no logs
    assert not any((tmp_path / "work" / "r1" / "jobs").glob("*/spool/events.jsonl")), "the spool was replayed"
    assert r.proc.poll() is None and writer.proc.poll() is None
