"""A job end to end with every process on its own NATS identity (docs/nats-auth.md).

One nats-server in operator mode with the generated configuration, provisioned by the provisioner identity; a
metrics-writer process (SQLite) and a notifier, each with its own creds; per test a runner process with its creds
and the trainer scoped key, which mints each attempt's trainer creds.  A test-only observer user with every right
reads the streams.  The notifier creates its ordered consumers by name,
as ``permissions.notifier()`` requires.
"""

from __future__ import annotations

import asyncio
import json
import stat
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from kiln_contracts import Event, JobStatus, subjects
from kiln_contracts.natsauth import permissions as perms
from kiln_contracts.natsauth.jwt import decode, parse_creds
from kiln_contracts.natsauth.provision import provision
from kiln_store import logs, make_engine, metric_events, status_events
from kiln_testing.natsauth import OBSERVER, AuthNats, add_observer, auth_nats, client
from kiln_testing.notifier import authorized, expect, running_notifier, ticket, ws_connect
from kiln_testing.runners import EventLog, RunnerProc, publish_start, spec
from kiln_testing.writer import WriterProc, drained, wait_for

POOL = "default"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CREDS_FILE = "nats.creds"

FORGER = '''"""A trainer that publishes one event of its own job, then forges another job's end and a start command."""
import asyncio, json, os
from pathlib import Path

import nats
from kiln_contracts import EpochCompleted, Event, JobFinished, JobStatus, subjects


async def main() -> None:
    errors = []

    async def on_error(exc):
        errors.append(str(exc))

    nc = await nats.connect(os.environ["KILN_NATS_URL"], user_credentials=os.environ["KILN_NATS_CREDS"],
                            inbox_prefix=os.environ["KILN_NATS_INBOX_PREFIX"], error_cb=on_error)
    js = nc.jetstream(timeout=2)
    job, project = os.environ["KILN_JOB_ID"], os.environ["KILN_PROJECT"]
    own = Event.new(job_id=job, project=project, attempt=1, seq=1, source="trainer",
                    data=EpochCompleted(epoch=1, epochs=1, metrics={"m": 1.0}))
    forged = Event.new(job_id=os.environ["VICTIM_JOB"], project=project, attempt=1, seq=1, source="runner",
                       data=JobFinished(status=JobStatus.completed, reason="forged"))
    report = {"forged_id": forged.id}
    for name, ev in (("own", own), ("forged", forged)):
        try:
            await js.publish(ev.subject, ev.to_bytes(), headers=ev.headers())
            report[name] = "acked"
        except Exception as exc:
            report[name] = type(exc).__name__
    await nc.publish(subjects.start("default"), b"{}")
    await nc.flush()
    await asyncio.sleep(0.3)
    report["errors"] = errors
    Path("forger.json").write_text(json.dumps(report))
    await nc.close()


asyncio.run(main())
'''

OUTLIVER = '''"""Reports a metric every 0.1 s through the Kiln SDK for STEPS steps, ignoring the runner's SIGTERM at the
attempt's timeout: its creds expire while it still reports."""
import os, signal, time

import kiln_sdk

with kiln_sdk.init() as run:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for step in range(int(os.environ["STEPS"])):
        run.log_metrics(step, {"loss": 1.0 / (step + 1)})
        time.sleep(0.1)
'''


@dataclass
class Stack:
    server: AuthNats
    db_url: str
    notifier: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("natscreds")
    with auth_nats(root / "bus", (POOL,)) as server:
        add_observer(server)

        async def prepare() -> None:
            prov = await client(server, "provisioner")
            await provision(prov.js, (POOL,))
            await prov.close()

        asyncio.run(prepare())
        db_url = f"sqlite+aiosqlite:///{root / 'kiln.db'}"
        writer = WriterProc(server.url, db_url, root / "writer.log", batch_ms=20,
                            nats_creds_file=server.creds("metrics-writer")).start()
        try:
            asyncio.run(writer.ready())
            with running_notifier(server.url, nats_creds_file=server.creds("notifier")) as notifier:
                yield Stack(server, db_url, notifier)
        finally:
            asyncio.run(writer.stop())


@pytest.fixture()
async def eyes(stack: Stack):
    """The observer's connection and a log of every event."""
    c = await client(stack.server, OBSERVER)
    log = await EventLog().start(c.js)
    yield c, log
    await c.close()


@pytest.fixture()
async def api(stack: Stack):
    c = await client(stack.server, "api")  # start commands come from the API's identity
    yield c
    await c.close()


@pytest.fixture()
def dataset(tmp_path: Path) -> str:
    d = tmp_path / "ds"
    d.mkdir()
    (d / "data.yaml").write_text("path: .\ntrain: images\nval: images\nnames: {0: a}\n")
    return str(d)


@pytest.fixture()
def runner(stack: Stack, tmp_path: Path):
    """Starts one runner process with its own creds and the trainer key (``trainer``: the script it runs)."""
    procs: list[RunnerProc] = []

    def start(trainer: list[str], **settings: object) -> RunnerProc:
        s = stack.server
        own = {"nats_creds_file": s.creds(f"runner-{POOL}"), "nats_account": s.chain.account,
               "trainer_signing_seed_file": str(s.chain.seed_path("trainer"))}
        r = RunnerProc(s.url, tmp_path / "runners", f"r{len(procs)}", tmp_path / "fake.log",
                       trainer_cmd=[sys.executable, *trainer], **own, **settings)
        procs.append(r)
        return r.wait_ready()

    yield start
    for r in procs:
        r.stop()


def _job() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"job-{tag}", f"proj{tag}"


def _job_dir(r: RunnerProc, job: str, attempt: int = 1) -> Path:
    return r.log_path.parent / r.name / "jobs" / f"{job}-{attempt}"


def _pid(log: EventLog, job: str) -> int | None:
    running = [e for e in log.of(job, "status") if e.data.status == JobStatus.running]
    return running[0].data.details["pid"] if running else None


def _check_trainer_creds(directory: Path, pid: int, project: str, job: str, timeout_s: int) -> str:
    """The creds of a running trainer: 0600 in its job folder, named in its environment, not in its argv, minted
    for its job until the attempt's deadline.  Returns the creds text."""
    path = directory / CREDS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    token, key = parse_creds(text)
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert CREDS_FILE.encode() not in cmdline and token.encode() not in cmdline and key.seed.encode() not in cmdline
    environ = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
                   if "=" in kv)
    assert environ["KILN_NATS_CREDS"] == str(path)
    assert environ["KILN_NATS_INBOX_PREFIX"] == f"_INBOX.{key.public_key}"
    claims = decode(token)
    assert claims["nats"]["tags"] == [f"project:{project}", f"job:{job}"]
    assert "pub" not in claims["nats"]  # its rights come from the scoped key's template only
    assert time.time() + timeout_s - 60 < claims["exp"] <= time.time() + timeout_s + 60 + 5  # + grace (60 s)
    return text


async def _stream(js: Any, project: str, job: str) -> list[Event]:
    """Every stored event and log batch of a job, events first, each stream in order."""
    out: list[Event] = []
    for stream, subject in ((perms.EVENTS, subjects.job_events(job, project)),
                            (perms.LOGS, subjects.log(project, job))):
        sub = await js.pull_subscribe(subject, stream=stream)
        total = (await sub.consumer_info()).num_pending
        got = 0
        while got < total:
            msgs = await sub.fetch(min(500, total - got), timeout=10)
            got += len(msgs)
            for m in msgs:
                out.append(Event.model_validate_json(m.data))
                await m.ack()
        await sub.unsubscribe()
    return out


async def _rows(db_url: str, job: str) -> dict[str, list[Any]]:
    engine = make_engine(db_url)
    try:
        async with engine.connect() as conn:
            async def ids(*columns: Any) -> list[Any]:
                table = columns[0].table
                rows = (await conn.execute(select(*columns).where(table.c.job_id == job))).all()
                return sorted(tuple(r) if len(r) > 1 else r[0] for r in rows)

            return {"metrics": await ids(metric_events.c.event_id), "status": await ids(status_events.c.event_id),
                    "logs": await ids(logs.c.event_id, logs.c.line_no)}
    finally:
        await engine.dispose()


async def _stored_exactly_once(stack: Stack, js: Any, project: str, job: str) -> list[Event]:
    """What the streams hold of the job, each event once, is what SQL holds, each row once."""
    await wait_for(lambda: drained(js), 30, "the writer to take everything")
    events = await _stream(js, project, job)
    assert len({e.id for e in events}) == len(events)
    rows = await _rows(stack.db_url, job)
    assert rows["metrics"] == sorted(e.id for e in events if e.data.kind in ("metrics", "epoch"))
    assert rows["status"] == sorted(e.id for e in events if e.data.kind in ("status", "finished"))
    assert rows["logs"] == sorted((e.id, i) for e in events if e.data.kind == "log" for i in range(len(e.data.lines)))
    return events


def _steps(events: list[Event]) -> list[int]:
    """The steps of the trainer's own metrics (not the SDK's system metrics), in stream order."""
    return [e.data.step for e in events if e.data.kind == "metrics" and "loss" in e.data.metrics]


async def _while(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def _relayed(ws: Any, want: set[str], timeout: float = 30) -> dict[str, dict[str, Any]]:
    """Read the socket until every event id of ``want`` has come; returns what came, by id (once each)."""
    got: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while not want <= set(got):
        assert time.monotonic() < deadline, f"the notifier did not relay {want - set(got)}"
        msg = await expect(ws, "event", timeout=deadline - time.monotonic())
        assert msg["event"]["id"] not in got, "relayed twice"
        got[msg["event"]["id"]] = msg
    return got


async def test_a_job_runs_on_its_own_identities_end_to_end(stack, eyes, api, runner, dataset, tmp_path) -> None:
    observer, log = eyes
    job, project = _job()
    r = runner([str(FIXTURES / "fake_trainer.py")])
    async with ws_connect(stack.notifier, f"/api/v1/ws/jobs/{job}", ticket(jobs={job: project})) as ws:
        await authorized(ws)
        await expect(ws, "subscribed")
        await publish_start(api.js, job, spec(dataset, seconds=3, project=project, timeout_s=600))
        await _while(lambda: _pid(log, job) is not None, 30, "the trainer to start")
        creds = _check_trainer_creds(_job_dir(r, job), _pid(log, job) or 0, project, job, 600)
        await log.wait(lambda: log.finished(job), timeout=60)
        assert log.finished(job)[0].data.status == JobStatus.completed
        events = await _stored_exactly_once(stack, observer.js, project, job)
        relayed = await _relayed(ws, {e.id for e in events if e.data.kind != "heartbeat"})
    assert {m["stream"] for m in relayed.values()} == {"events", "logs"}
    assert not (_job_dir(r, job) / CREDS_FILE).exists()  # deleted once the trainer was gone
    token, key = parse_creds(creds)
    assert token not in r.log_path.read_text() and key.seed not in r.log_path.read_text()
    assert "NATS USER" not in json.dumps([e.model_dump(mode="json") for e in events])


async def test_the_sdk_trainer_reports_live_with_its_minted_creds(stack, eyes, api, runner, dataset) -> None:
    observer, log = eyes
    job, project = _job()
    r = runner([str(FIXTURES / "sdk_trainer.py")])
    await publish_start(api.js, job, spec(dataset, seconds=1, project=project, timeout_s=600))  # 20 steps
    await _while(lambda: _pid(log, job) is not None, 30, "the trainer to start")
    _check_trainer_creds(_job_dir(r, job), _pid(log, job) or 0, project, job, 600)
    await log.wait(lambda: len(log.of(job, "metrics")) >= 5, timeout=30)  # live, from the trainer's own connection
    assert not log.finished(job)
    await log.wait(lambda: log.finished(job), timeout=60)
    assert log.finished(job)[0].data.status == JobStatus.completed
    events = await _stored_exactly_once(stack, observer.js, project, job)
    assert _steps(events) == list(range(20))
    assert {e.source for e in events if e.data.kind == "metrics"} == {"trainer"}
    assert "spooled event" not in r.log_path.read_text()  # nothing went through the spool
    assert not any("kiln_sdk:" in ln.text for e in events if e.data.kind == "log" for ln in e.data.lines)
    assert not (_job_dir(r, job) / CREDS_FILE).exists()


async def test_a_trainer_cannot_forge_another_jobs_events(stack, eyes, api, runner, dataset, tmp_path) -> None:
    observer, log = eyes
    job, project = _job()
    victim = f"victim-{uuid.uuid4().hex[:8]}"
    forger = tmp_path / "forger.py"
    forger.write_text(FORGER)
    r = runner([str(forger)], trainer_env={"VICTIM_JOB": victim})
    await publish_start(api.js, job, spec(dataset, project=project, timeout_s=600))
    await log.wait(lambda: log.finished(job), timeout=60)
    report = json.loads((_job_dir(r, job) / "forger.json").read_text())
    assert report["own"] == "acked"
    assert report["forged"] == "TimeoutError"  # refused: no ack ever comes
    violations = [e for e in report["errors"] if "permissions violation" in e]
    assert any(f'publish to "{subjects.event(project, victim, "finished")}"' in v for v in violations), violations
    assert any(f'publish to "{subjects.start(POOL)}"' in v for v in violations), violations
    await _stored_exactly_once(stack, observer.js, project, job)
    assert await _stream(observer.js, project, victim) == []
    assert await _rows(stack.db_url, victim) == {"metrics": [], "status": [], "logs": []}
    assert [e.id for e in log.events if e.id == report["forged_id"]] == []


async def test_a_trainer_whose_creds_expire_mid_run_loses_nothing(stack, eyes, api, runner, dataset,
                                                                  tmp_path) -> None:
    observer, log = eyes
    job, project = _job()
    script = tmp_path / "outliver.py"
    script.write_text(OUTLIVER)
    steps = 150  # 15 s: the attempt times out after 10 s, its creds expire 1 s later
    r = runner([str(script)], trainer_env={"STEPS": str(steps)}, trainer_creds_grace_s=1, kill_grace_s=30)
    await publish_start(api.js, job, spec(dataset, project=project, timeout_s=10))
    await log.wait(lambda: len(log.of(job, "metrics")) >= 5, timeout=30)  # live while its creds are valid
    assert not log.finished(job)
    await log.wait(lambda: log.finished(job), timeout=60)
    events = await _stored_exactly_once(stack, observer.js, project, job)
    assert sorted(_steps(events)) == list(range(steps))
    assert "spooled event(s) from" in r.log_path.read_text()  # the runner replayed what the trainer could not send
    assert not (_job_dir(r, job) / CREDS_FILE).exists()

