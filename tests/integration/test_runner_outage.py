"""NATS away for two minutes while a job trains and ends: nothing the trainer or the runner reported is lost or
duplicated, and the job ends completed (real nats-server stopped and restarted on its store, a real runner, a
trainer reporting through the real SDK)."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import nats
import pytest

from kiln_contracts import Event, JobStatus, streams
from kiln_testing.runners import EventLog, RunnerProc, publish_start, spec

pytestmark = pytest.mark.slow
SDK_TRAINER = str(Path(__file__).resolve().parents[1] / "fixtures" / "sdk_trainer.py")
OUTAGE_S = 120.0


async def log_batches(js, job: str) -> list[Event]:
    sub = await js.subscribe(f"kiln.log.*.{job}", ordered_consumer=True)
    batches: list[Event] = []
    try:
        while True:
            batches.append(Event.model_validate_json((await sub.next_msg(timeout=1.0)).data))
    except Exception:  # noqa: BLE001 - nothing more
        pass
    await sub.unsubscribe()
    return batches


async def test_a_two_minute_nats_outage_loses_and_duplicates_nothing(nats_server, tmp_path):
    data = tmp_path / "ds"
    data.mkdir()
    (data / "data.yaml").write_text("path: .\ntrain: images\nval: images\nnames: {0: a}\n")
    nc = await nats.connect(nats_server.url)
    await streams.ensure_streams(nc.jetstream())
    await nc.close()
    # lost_after_s: longer than the attempt still needs once the bus is gone (the trainer's last steps, its SDK's
    # close, the runner's replay try: about 15-20 s), else the runner's claim lapses first and, by design, it stops
    # and reports nothing (test_runner_faults, the claim watch); the outage is still three times as long.
    runner = RunnerProc(nats_server.url, tmp_path / "runners", "r", tmp_path / "fake.log",
                        trainer_cmd=[sys.executable, SDK_TRAINER], heartbeat_s=2, lost_after_s=40, reaper_lease_s=3)
    try:
        await runner.ready()
        nc = await nats.connect(nats_server.url)
        await publish_start(nc.jetstream(), "outage", spec(str(data), seconds=2.5))  # 50 steps over about 5 s
        log = await EventLog().start(nc.jetstream())
        await log.wait(lambda: len(log.of("outage", "metrics")) >= 5, timeout=30)
        await nc.close()
        nats_server.stop()  # the bus is gone while the trainer trains on, ends, and the runner reports it
        t_down = time.monotonic()
        await asyncio.sleep(OUTAGE_S)
        runner_log = runner.log_path.read_text()
        assert "spooled" in runner_log, runner_log[-3000:]
        nats_server.start()
        t_up = time.monotonic()

        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        log = await EventLog().start(js)
        await log.wait(lambda: log.finished("outage"), timeout=60)
        caught_up = time.monotonic() - t_up
        await asyncio.sleep(3)  # anything later (a duplicate, a stray "lost") would show up now
        fin = log.finished("outage")
        assert [(e.attempt, e.data.status) for e in fin] == [(1, JobStatus.completed)]
        steps = Counter(e.data.step for e in log.of("outage", "metrics") if "loss" in e.data.metrics)
        assert sorted(steps) == list(range(50)) and set(steps.values()) == {1}, steps
        ids = [e.id for e in log.of("outage")]
        assert len(ids) == len(set(ids))
        batches = await log_batches(js, "outage")
        mine = [e.seq for e in [*log.of("outage"), *batches] if e.source == "runner"]
        assert sorted(mine) == list(range(1, max(mine) + 1)), mine  # the runner's events: gap-free, once each
        lines = [ln.text for b in batches for ln in b.data.lines if ln.text.startswith("step ")]
        assert Counter(lines) == Counter(f"step {i} of 50" for i in range(50))
        spooled_dirs = list((tmp_path / "runners" / "r" / "jobs").glob("*/*spool*/events.jsonl"))
        assert spooled_dirs == []  # every spool published and deleted
        await nc.close()
        print(f"outage {t_up - t_down:.0f}s; all events in the stream {caught_up:.1f}s after NATS came back")
    finally:
        runner.kill(signal.SIGKILL)
        runner.proc.wait()
