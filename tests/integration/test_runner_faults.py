"""Runner faults on real NATS JetStream and real subprocesses: a start command that cannot be processed, a cancel
sent while the runner is cut off from NATS, a KV error while checking the cancel mark, a trainer that raises."""

import asyncio
import json
import signal
import sys
import time

import httpx
import nats
import pytest
from nats.errors import NoRespondersError
from nats.js.errors import KeyNotFoundError

from kiln_contracts import ExitClass, JobStatus, streams, subjects
from kiln_testing.proxy import TcpProxy
from kiln_testing.runners import (
    FAKE_TRAINER, EventLog, RunnerProc, pid_alive, publish_start, read_fake_log, spec,
)


@pytest.fixture()
def dataset(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    (d / "data.yaml").write_text("path: .\ntrain: images\nval: images\nnames: {0: a}\n")
    return str(d)


def raw_start(job_id: str, dataset: str, scale: str, *, attempt: int = 1, project: str = "proj") -> bytes:
    """A start command as bytes, with ``scale`` spelled verbatim: ``1e400`` and ``NaN`` are what Python's json
    reads as inf and nan (a client that bypasses the API can send them)."""
    return (f'{{"v": 1, "job_id": "{job_id}", "attempt": {attempt}, "spec": {{"project": "{project}", '
            f'"model": "yolov8n.yaml", "dataset": {json.dumps(dataset)}, "train": {{"scale": {scale}}}}}}}').encode()


# --- (7) a start command that cannot be processed ends its job "failed" -----------------------------------------

@pytest.mark.parametrize("scale", ["1e400", "NaN"])
async def test_a_start_command_with_a_non_finite_number_fails_its_job(bus, runners, dataset, scale):
    nc, js, log = bus
    runners("a").wait_ready()
    job = "inf" if scale == "1e400" else "nan"
    await js.publish(subjects.start("default"), raw_start(job, dataset, scale), headers={"Nats-Msg-Id": f"{job}:1"})
    await log.wait(lambda: log.finished(job), timeout=20)
    [fin] = log.finished(job)
    assert (fin.attempt, fin.project, fin.source) == (1, "proj", "runner")
    assert (fin.data.status, fin.data.exit_class) == (JobStatus.failed, ExitClass.user_error)
    assert fin.data.reason.startswith("invalid start command: spec.train.scale: "), fin.data.reason
    assert "finite" in fin.data.reason
    dlq = await js.pull_subscribe(subjects.dlq("runner-default"), stream="KILN_DLQ")
    [dead] = await dlq.fetch(1, timeout=5)
    assert "invalid start command" in dead.headers["Kiln-Reason"]
    await publish_start(js, "good", spec(dataset, seconds=0.5))  # the runner goes on
    await log.wait(lambda: log.finished("good"), timeout=20)
    assert log.finished("good")[0].data.status == JobStatus.completed


async def test_an_invalid_start_command_never_ends_an_attempt_a_runner_holds(bus, runners, dataset):
    """A garbage command naming a claimed (running) attempt is dead-lettered and ends nothing: no hijack."""
    nc, js, log = bus
    runners("a").wait_ready()
    claims = await js.key_value(streams.CLAIMS_BUCKET)
    await claims.create("held.1", b"some-runner")
    await js.publish(subjects.start("default"), raw_start("held", dataset, "NaN"))
    await js.publish(subjects.start("default"), b'{"v": 1, "job_id": "bad id!", "spec": {}}')  # no usable id
    other_version = raw_start("other-version", dataset, "NaN").replace(b'"v": 1', b'"v": 7')
    await js.publish(subjects.start("default"), other_version)
    await publish_start(js, "after", spec(dataset, seconds=0.5))
    await log.wait(lambda: log.finished("after"), timeout=20)
    dlq = await js.pull_subscribe(subjects.dlq("runner-default"), stream="KILN_DLQ")
    assert len(await dlq.fetch(3, timeout=5)) == 3
    assert {e.job_id for e in log.events if e.data.kind == "finished"} == {"after"}


async def test_an_invalid_start_command_shows_failed_with_its_reason_through_the_api(tmp_path, dataset):
    """Through the real writer and API: the job a client created reads ``failed`` with the validation reason."""
    from kiln_local.stack import Stack, StackConfig, free_port

    cfg = StackConfig(data_dir=tmp_path / "kiln", api_port=free_port(), notifier_port=free_port(),
                      nats_port=free_port())
    with Stack(cfg) as stack:
        api, auth = stack.api_url, {"Authorization": f"Bearer {stack.owner_key()}"}
        r = httpx.post(f"{api}/api/v1/jobs", json={"model": "yolov8n.yaml", "dataset": dataset}, timeout=10,
                       headers=auth)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        from kiln_testing.natsauth import observer_options

        nc = await nats.connect(stack.nats_url, **observer_options(stack.bus.chain))
        try:
            await nc.jetstream().publish(subjects.start("default"),
                                         raw_start(job_id, dataset, "1e400", project="default"))
        finally:
            await nc.close()
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient(headers=auth) as client:
            while time.monotonic() < deadline:
                job = (await client.get(f"{api}/api/v1/jobs/{job_id}", timeout=10)).json()
                if job["status"] != "created":
                    break
                await asyncio.sleep(0.2)
        assert job["status"] == "failed", job
        assert job["reason"].startswith("invalid start command: spec.train.scale: "), job["reason"]


# --- (8) cancel reaches a running attempt whatever the timing ---------------------------------------------------

async def test_a_cancel_sent_while_the_runner_is_disconnected_stops_the_job_once_it_is_back(
        bus, runners, dataset, nats_server, tmp_path):
    nc, js, log = bus
    proxy = await TcpProxy(("127.0.0.1", nats_server.port)).start()
    try:
        # cancel_check_s=60: the periodic read cannot be what stops the job within the test's limit; the read at
        # reconnect must
        await runners("a", url=proxy.url, cancel_check_s=60).ready()
        await publish_start(js, "long", spec(dataset, seconds=60))
        await log.wait(lambda: any(e.data.status == JobStatus.running for e in log.of("long", "status")))
        linked = proxy.accepted
        await proxy.cut()  # the runner is cut off from NATS; the API (this test) is not
        await asyncio.sleep(0.3)
        # What the API's cancel does (kiln_api.adapters.bus.Bus.request_cancel, for a running job):
        claims = await js.key_value(streams.CLAIMS_BUCKET)
        await claims.put("long.cancel", b"stop it")
        await nc.publish(subjects.cancel("long"), b'{"v": 1, "job_id": "long", "reason": "stop it"}')
        await nc.flush()
        await asyncio.sleep(1.0)  # the core message is gone for good: nobody of the runner was listening
        assert not log.finished("long")
        await proxy.start()
        t_back = time.monotonic()
        await log.wait(lambda: log.finished("long"), timeout=20)
        t_end = time.monotonic()
        took, after_reconnect = t_end - t_back, t_end - proxy.last_accept
        fin = log.finished("long")[0].data
        assert (fin.status, fin.reason, fin.exit_code) == (JobStatus.cancelled, "stop it", 3)
        assert proxy.accepted > linked, "the runner did not reconnect through the proxy"
        assert took < 8, f"cancelled {took:.1f}s after NATS came back"
        assert after_reconnect < 3, f"cancelled {after_reconnect:.1f}s after the runner reconnected"
        print(f"cancelled {took:.2f}s after the link to NATS was restored, {after_reconnect:.3f}s after the runner "
              "reconnected")
    finally:
        await proxy.close()


async def test_a_cancel_mark_without_its_message_still_stops_a_running_job(bus, runners, dataset):
    """The API's core message lost (the API died between the KV write and the publish): the mark alone is enough."""
    nc, js, log = bus
    runners("a", cancel_check_s=1).wait_ready()
    await publish_start(js, "marked", spec(dataset, seconds=60))
    await log.wait(lambda: any(e.data.status == JobStatus.running for e in log.of("marked", "status")))
    claims = await js.key_value(streams.CLAIMS_BUCKET)
    await claims.put("marked.cancel", b"marked only")
    t0 = time.monotonic()
    await log.wait(lambda: log.finished("marked"), timeout=10)
    fin = log.finished("marked")[0].data
    assert (fin.status, fin.reason, fin.exit_code) == (JobStatus.cancelled, "marked only", 3)
    assert time.monotonic() - t0 < 3


class FlakyClaims:
    """The claims bucket, whose reads of cancel marks fail (JetStream not answering) while ``failing`` is set."""

    def __init__(self, kv) -> None:  # type: ignore[no-untyped-def]
        self.kv, self.failing = kv, True

    async def get(self, key: str):  # type: ignore[no-untyped-def]
        if self.failing and key.endswith(".cancel"):
            raise NoRespondersError
        return await self.kv.get(key)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.kv, name)


class Delivery:
    """The parts of FastStream's NatsMessage the runner's handler uses, over a real JetStream message."""

    def __init__(self, raw) -> None:  # type: ignore[no-untyped-def]
        self.raw_message = raw

    async def ack(self) -> None:
        await self.raw_message.ack()

    async def nack(self, delay: float | None = None) -> None:
        await self.raw_message.nak(delay=delay)

    async def reject(self) -> None:
        await self.raw_message.term()


async def test_a_kv_error_while_reading_the_cancel_mark_never_starts_the_job(bus, dataset, tmp_path, monkeypatch):
    from kiln_runner.handlers import Runner
    from kiln_runner.reaper import open_buckets
    from kiln_runner.settings import Settings

    nc, js, log = bus
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "fake.log"))
    claims = await js.key_value(streams.CLAIMS_BUCKET)
    registry, _ = await open_buckets(js)
    settings = Settings(nats_url="nats://unused:1", work_dir=tmp_path / "work", runner_id="flaky",
                        trainer_cmd=[sys.executable, FAKE_TRAINER])
    flaky = FlakyClaims(claims)
    runner = Runner(settings, nc, flaky, registry)
    await js.add_consumer("KILN_JOBS", streams.runner_consumer("default", ack_wait=60))
    sub = await js.pull_subscribe_bind("runner-default", stream="KILN_JOBS")
    await claims.put("kv-err.cancel", b"cancelled while queued")
    await publish_start(js, "kv-err", spec(dataset, seconds=30))
    try:
        [msg] = await sub.fetch(1, timeout=5)
        with pytest.raises(NoRespondersError):
            await asyncio.wait_for(runner.on_start(Delivery(msg)), 10)
        assert not read_fake_log(tmp_path / "fake.log"), "a job whose cancel mark could not be read was started"
        with pytest.raises(KeyNotFoundError):
            await claims.get("kv-err.1")  # not claimed: the redelivered command can still be handled
        assert runner.slots.free == 1 and not runner.jobs
        flaky.failing = False
        t0 = time.monotonic()
        [again] = await sub.fetch(1, timeout=5)  # redelivered after the runner's short delay, not the ack wait
        assert time.monotonic() - t0 < 5
        await asyncio.wait_for(runner.on_start(Delivery(again)), 10)
        await log.wait(lambda: log.finished("kv-err"), timeout=10)
        fin = log.finished("kv-err")[0].data
        assert (fin.status, fin.reason) == (JobStatus.cancelled, "cancelled while queued")
        assert not read_fake_log(tmp_path / "fake.log")
    finally:
        for job in list(runner.jobs.values()):
            job.cancel("test over")
        if runner.tasks:
            await asyncio.wait(set(runner.tasks), timeout=30)


# --- (12) the trainer's exception is the failure reason ---------------------------------------------------------

RAISING_TRAINER = """
import time
print("kiln: versions kiln=0 ultralytics=0", flush=True)
time.sleep(0.3)  # the note above and the traceback below reach the runner in this order
def init_seeds(seed):
    raise ValueError("Seed must be between 0 and 2**32 - 1")
init_seeds(-1)
"""


async def test_a_trainer_that_raises_reports_its_exception_as_the_reason(bus, runners, dataset):
    nc, js, log = bus
    runners("a", trainer_cmd=[sys.executable, "-c", RAISING_TRAINER]).wait_ready()
    await publish_start(js, "raises", spec(dataset, seconds=1))
    await log.wait(lambda: log.finished("raises"), timeout=20)
    fin = log.finished("raises")[0].data
    assert (fin.status, fin.exit_code, fin.exit_class) == (JobStatus.failed, 1, ExitClass.user_error)
    assert fin.reason == "trainer failed: ValueError: Seed must be between 0 and 2**32 - 1 (exit code 1)"
    assert fin.last_logs[-1] == "ValueError: Seed must be between 0 and 2**32 - 1"


async def test_a_failure_in_retry_on_is_retried_after_its_backoff_and_a_user_error_never(nats_server, tmp_path):
    """Out of memory twice, then fine: three attempts, 1 s then 2 s apart; a user error ends the job at once."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await streams.ensure_streams(js)
    log = await EventLog().start(js)
    data = tmp_path / "ds"
    data.mkdir()
    (data / "data.yaml").write_text("path: .\ntrain: images\nval: images\nnames: {0: a}\n")
    r = RunnerProc(nats_server.url, tmp_path / "runners", "r", tmp_path / "fake.log", slots=2)
    try:
        await r.ready()
        await publish_start(js, "oom", spec(str(data), seconds=0.5, name="oom-until-3", max_attempts=3, retry_backoff_s=1))
        await publish_start(js, "usr", spec(str(data), seconds=0.5, name="user-error", max_attempts=3,
                                            retry_on=["infrastructure", "out_of_memory", "killed"]))
        await log.wait(lambda: log.finished("oom") and log.finished("usr"), timeout=60)
        assert [(e.attempt, e.data.status) for e in log.finished("oom")] == [(3, JobStatus.completed)]
        queued = [e for e in log.of("oom", "status") if e.data.status == JobStatus.queued]
        assert [e.attempt for e in queued] == [2, 3]
        assert "attempt 1 failed (out_of_memory: out of memory" in queued[0].data.reason
        assert "retrying in 1s as attempt 2" in queued[0].data.reason and "retrying in 2s" in queued[1].data.reason
        starts = {a: t for what, job, a, _, t in read_fake_log(tmp_path / "fake.log") if job == "oom" and what == "start"}
        assert starts[2] - starts[1] >= 1.0 and starts[3] - starts[2] >= 2.0, starts
        usr = log.finished("usr")
        assert [(e.attempt, e.data.status, e.data.exit_class) for e in usr] == [
            (1, JobStatus.failed, ExitClass.user_error)]
    finally:
        r.kill(signal.SIGKILL)
        r.proc.wait()
        await nc.close()


SMUGGLER = """
import json, os, pathlib
from kiln_contracts import EpochCompleted, Event, JobFinished, JobStatus
job, project = os.environ["KILN_JOB_ID"], os.environ["KILN_PROJECT"]
own = Event.new(job_id=job, project=project, attempt=1, seq=1, source="trainer",
                data=EpochCompleted(epoch=1, epochs=1, metrics={"m": 1.0}))
forged = [Event.new(job_id="victim", project=project, attempt=1, seq=1, source="runner",
                    data=JobFinished(status=JobStatus.completed, reason="forged")),
          Event.new(job_id=job, project="other-project", attempt=1, seq=2, source="trainer",
                    data=EpochCompleted(epoch=1, epochs=1, metrics={"m": 9.0}))]
spool = pathlib.Path(os.environ["KILN_SPOOL_DIR"])
spool.mkdir(parents=True, exist_ok=True)
with open(spool / "events.jsonl", "ab") as fh:
    for ev in (forged[0], own, forged[1]):
        fh.write(ev.to_bytes() + b"\\n")
pathlib.Path(os.environ["KILN_JOB_DIR"], "ids.json").write_text(json.dumps([own.id] + [f.id for f in forged]))
"""


async def test_a_trainer_cannot_smuggle_another_jobs_events_through_its_spool(bus, runners, dataset, tmp_path):
    """The runner replays a trainer's spool with its own, wider identity: only the trainer's own job's events leave;
    another job's, or its own job under another project, are kept aside (rejected.jsonl), never published."""
    nc, js, log = bus
    runners("a", trainer_cmd=[sys.executable, "-c", SMUGGLER]).wait_ready()
    await publish_start(js, "smuggler", spec(dataset, seconds=1))
    await log.wait(lambda: log.finished("smuggler"), timeout=20)
    job_dir = tmp_path / "runners" / "a" / "jobs" / "smuggler-1"
    own, *forged = json.loads((job_dir / "ids.json").read_text())
    await log.wait(lambda: any(e.id == own for e in log.of("smuggler")), timeout=10)
    seen = {e.id for e in log.events}
    assert own in seen and not seen & set(forged)
    assert log.of("victim") == []
    rejected = (job_dir / "spool" / "rejected.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in rejected) == sorted(forged)


async def test_a_runner_cut_off_from_the_bus_stops_its_trainer_once_its_claim_lapses(
        bus, runners, dataset, nats_server, tmp_path):
    """A runner host loses the bus mid-training: after lost_after_s without renewing its claim it stops its trainer
    by itself (no GPU kept busy, never two trainers for one job), another runner's reaper retries the attempt, and
    once the link is back the cut-off runner reports nothing for the attempt it gave up."""
    nc, js, log = bus
    proxy = await TcpProxy(("127.0.0.1", nats_server.port)).start()
    try:
        await runners("a", url=proxy.url, heartbeat_s=1, lost_after_s=4, reaper_lease_s=2).ready()
        await publish_start(js, "cutoff", spec(dataset, seconds=60, max_attempts=2))
        await log.wait(lambda: any(r[0] == "start" for r in read_fake_log(tmp_path / "fake.log")))
        [first] = [r[3] for r in read_fake_log(tmp_path / "fake.log") if r[0] == "start"]
        await runners("b", heartbeat_s=1, lost_after_s=4, reaper_lease_s=2).ready()
        await proxy.cut()
        t_cut = time.monotonic()
        while pid_alive(first) and time.monotonic() - t_cut < 15:
            await asyncio.sleep(0.1)
        stopped = time.monotonic() - t_cut
        assert not pid_alive(first), "the cut-off runner kept its trainer going"
        assert 3 <= stopped < 10, stopped  # lost_after_s after its last renewal (heartbeat_s before the cut)
        await log.wait(lambda: any(r[0] == "start" and r[2] == 2 for r in read_fake_log(tmp_path / "fake.log")),
                       timeout=20)  # a reaper retried it: runner b trains attempt 2
        starts = [r for r in read_fake_log(tmp_path / "fake.log") if r[0] == "start"]
        assert [r[2] for r in starts] == [1, 2]
        await proxy.start()  # the link is back: the cut-off runner must not report attempt 1's end
        await asyncio.sleep(5)
        assert log.finished("cutoff") == []  # attempt 1 ends silently; attempt 2 trains on
        assert pid_alive(starts[1][3])
        print(f"trainer stopped {stopped:.1f}s after its runner was cut off")
    finally:
        await proxy.close()
