"""Runners as real processes on real NATS JetStream, with a stand-in trainer subprocess (no YOLO needed here)."""

import asyncio
import signal
import time

import pytest

from kiln_contracts import JobStatus, streams
from kiln_testing.runners import pid_alive, publish_start, read_fake_log, spec


@pytest.fixture()
def dataset(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    (d / "data.yaml").write_text("path: .\ntrain: images\nval: images\nnames: {0: a}\n")
    return str(d)


async def test_three_runners_share_six_jobs_each_runs_once(bus, runners, dataset, tmp_path):
    nc, js, log = bus
    rs = [runners(f"r{i}") for i in range(3)]
    for r in rs:
        r.wait_ready()
    jobs = [f"job{i}" for i in range(6)]
    for j in jobs:
        await publish_start(js, j, spec(dataset, seconds=1.5))
    await log.wait(lambda: all(log.finished(j) for j in jobs), timeout=60)
    assert all(log.finished(j)[0].data.status == JobStatus.completed for j in jobs)
    starts = [row for row in read_fake_log(tmp_path / "fake.log") if row[0] == "start"]
    assert sorted(r[1] for r in starts) == jobs  # each exactly once
    # at most 3 at a time: sweep the start/end timeline
    events = sorted([(t, +1) for w, *_, t in read_fake_log(tmp_path / "fake.log") if w == "start"]
                    + [(t, -1) for w, *_, t in read_fake_log(tmp_path / "fake.log") if w == "end"])
    running = peak = 0
    for _, d in events:
        running += d
        peak = max(peak, running)
    assert peak == 3
    assert len({e.data.runner for j in jobs for e in log.of(j, "status") if e.data.status == JobStatus.running}) == 3


async def test_same_start_command_twice_starts_one_trainer(bus, runners, dataset, tmp_path):
    nc, js, log = bus
    runners("a").wait_ready()
    runners("b").wait_ready()
    job_spec = spec(dataset, seconds=1)
    await publish_start(js, "dup", job_spec, msg_id="first")
    await publish_start(js, "dup", job_spec, msg_id="second")  # stored twice: delivered twice
    await log.wait(lambda: log.finished("dup"), timeout=30)
    await asyncio.sleep(1.0)
    assert [r[1] for r in read_fake_log(tmp_path / "fake.log") if r[0] == "start"] == ["dup"]
    assert len(log.finished("dup")) == 1


async def test_malformed_start_command_is_dead_lettered_and_the_runner_goes_on(bus, runners, dataset):
    nc, js, log = bus
    runners("a").wait_ready()
    await js.publish("kiln.cmd.start.default", b"{broken")
    await js.publish("kiln.cmd.start.default", b'{"v": 7, "job_id": "x", "spec": {}}')
    await publish_start(js, "good", spec(dataset, seconds=0.5))
    await log.wait(lambda: log.finished("good"), timeout=30)
    sub = await js.pull_subscribe("kiln.dlq.runner-default", stream="KILN_DLQ")
    msgs = await sub.fetch(2, timeout=5)
    assert [m.data for m in msgs] == [b"{broken", b'{"v": 7, "job_id": "x", "spec": {}}']
    assert all("invalid start command" in m.headers["Kiln-Reason"] for m in msgs)
    assert msgs[0].headers["Kiln-Stream-Seq"] == "1"


async def test_cancel_running_and_queued_jobs(bus, runners, dataset, tmp_path):
    nc, js, log = bus
    runners("a").wait_ready()
    await publish_start(js, "long", spec(dataset, seconds=30))
    await log.wait(lambda: any(e.data.status == JobStatus.running for e in log.of("long", "status")))
    # cancel of a queued job: the API marks it in the claims KV before the runner sees the start command
    kv = await js.key_value(streams.CLAIMS_BUCKET)
    await kv.put("queued.cancel", b"cancelled by user")
    await publish_start(js, "queued", spec(dataset, seconds=1))
    t0 = time.monotonic()
    await nc.publish("kiln.cmd.cancel.long", b'{"v": 1, "job_id": "long", "reason": "stop it"}')
    await log.wait(lambda: log.finished("long") and log.finished("queued"), timeout=30)
    assert time.monotonic() - t0 < 10
    fin = log.finished("long")[0].data
    assert (fin.status, fin.reason, fin.exit_code) == (JobStatus.cancelled, "stop it", 3)
    assert log.finished("queued")[0].data.status == JobStatus.cancelled
    assert "queued" not in [r[1] for r in read_fake_log(tmp_path / "fake.log")]  # never started


async def test_sigkill_runner_kills_its_trainers_and_jobs_are_retried_or_lost(bus, runners, dataset, tmp_path):
    nc, js, log = bus
    a = runners("a", slots=2, lost_after_s=10, reaper_lease_s=5)
    a.wait_ready()
    await publish_start(js, "retry-me", spec(dataset, seconds=6, max_attempts=2))
    await publish_start(js, "lose-me", spec(dataset, seconds=60, max_attempts=1))
    await log.wait(lambda: all(any(e.data.status == JobStatus.running for e in log.of(j, "status"))
                               for j in ("retry-me", "lose-me")), timeout=30)
    b = runners("b", lost_after_s=10, reaper_lease_s=5)
    b.wait_ready()
    pids = [r[3] for r in read_fake_log(tmp_path / "fake.log") if r[0] == "start"]
    assert len(pids) == 2 and all(pid_alive(p) for p in pids)
    a.kill(signal.SIGKILL)
    t_kill = time.monotonic()
    while any(pid_alive(p) for p in pids) and time.monotonic() - t_kill < 5:
        await asyncio.sleep(0.05)
    assert not any(pid_alive(p) for p in pids), "trainers outlived their runner"
    await log.wait(lambda: log.finished("lose-me") and any(
        e.attempt == 2 for e in log.of("retry-me", "status")), timeout=60)
    assert time.monotonic() - t_kill < 60
    lost = log.finished("lose-me")[0]
    assert lost.data.status == JobStatus.lost and "runner a stopped sending heartbeats" in lost.data.reason
    await log.wait(lambda: any(e.attempt == 2 for e in log.finished("retry-me")), timeout=30)
    done = [e for e in log.finished("retry-me") if e.attempt == 2][0]
    assert done.data.status == JobStatus.completed
    assert not [e for e in log.finished("retry-me") if e.attempt == 1]  # attempt 1 was never reported "finished"


async def test_sigterm_runner_hands_its_running_job_back(bus, runners, dataset, tmp_path):
    nc, js, log = bus
    a = runners("a", shutdown_grace_s=1, cancel_grace_s=2)
    a.wait_ready()
    await publish_start(js, "handoff", spec(dataset, seconds=5))
    await log.wait(lambda: any(e.data.status == JobStatus.running for e in log.of("handoff", "status")))
    b = runners("b")
    b.wait_ready()
    a.kill(signal.SIGTERM)
    assert a.proc.wait(20) == 0
    await log.wait(lambda: any(e.attempt == 2 for e in log.finished("handoff")), timeout=30)
    fin = [e for e in log.finished("handoff")]
    assert [(e.attempt, e.data.status) for e in fin] == [(2, JobStatus.completed)]
    queued2 = [e for e in log.of("handoff", "status") if e.attempt == 2 and e.data.status == JobStatus.queued]
    assert queued2 and "shut down" in queued2[0].data.reason


async def test_each_slot_gets_its_own_gpu_and_the_timeout_stops_a_job(bus, runners, dataset, tmp_path):
    nc, js, log = bus
    runners("gpu", slots=2, gpus=["0", "1"], kill_grace_s=2).wait_ready()
    await publish_start(js, "g1", spec(dataset, seconds=2))
    await publish_start(js, "g2", spec(dataset, seconds=60, timeout_s=10))
    await log.wait(lambda: log.finished("g1") and log.finished("g2"), timeout=40)
    devices = sorted(next(e.data.details["cuda_visible_devices"] for e in log.of(j, "status")
                          if e.data.status == JobStatus.running) for j in ("g1", "g2"))
    assert devices == ["0", "1"]
    timed_out = log.finished("g2")[0].data
    assert (timed_out.status, timed_out.exit_class.value) == (JobStatus.failed, "timeout")
    assert "timeout" in timed_out.reason
    record = next(e.data.details for e in log.of("g1", "status") if e.data.status == JobStatus.running)
    for key in ("dataset_snapshot", "seed", "host", "version_kiln", "version_torch", "version_ultralytics"):
        assert key in record, key
