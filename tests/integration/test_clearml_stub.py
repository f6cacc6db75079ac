"""ClearML forwarder against a local HTTP stub of the ClearML API and files server: real nats-server, the
forwarder's run() in-process, and the requests the stub received as the thing checked.  Also a server that is
down, slow, or refusing one job at first: the forwarder backs off, loses nothing and creates no second task."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest

from kiln_clearml_forwarder.main import run
from kiln_clearml_forwarder.settings import Settings
from kiln_contracts import streams, subjects

from kiln_testing.clearml_stub import (
    ClearMLStub, clearml_env, drained, job_events, publish, task_record, wait_for,
)

# ClearML's bundled pyhocon uses pyparsing names deprecated in pyparsing 3.3
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

EXPECTED = {("train", "box_loss", 1, 1.0), ("train", "box_loss", 2, 0.5), ("train", "box_loss", 3, 1 / 3)}


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory):
    env = clearml_env(tmp_path_factory.getbasetemp() / "clearml")
    server = ClearMLStub(env["port"])
    server.start()
    server.env = env  # type: ignore[attr-defined]
    yield server
    server.stop()


@pytest.fixture()
def clearml(stub: ClearMLStub) -> ClearMLStub:
    stub.reset()
    if not stub._server:
        stub.start()
    return stub


@contextlib.asynccontextmanager
async def forwarder(url: str, stub: ClearMLStub, **overrides: Any) -> AsyncIterator[Any]:
    """A running forwarder (in-process) and a JetStream context to publish with."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await streams.ensure_streams(js)
    values: dict[str, Any] = dict(fetch_ms=50, linger_s=0.3, backoff_initial_s=0.1, max_backoff_s=0.5,
                                  call_timeout_s=2.0)
    settings = Settings(enabled=True, nats_url=url, config_file=stub.env["config_file"],  # type: ignore[attr-defined]
                        **{**values, **overrides})
    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, stop))
    try:
        yield js
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await nc.close()


def _task_of(stub: ClearMLStub, job_id: str) -> dict[str, Any]:
    found = [t for t in stub.tasks.values() if f"kiln-job:{job_id}" in t.get("system_tags", [])]
    assert len(found) == 1, f"expected one task for {job_id}, found {len(found)}"
    return found[0]


async def _completed(js: Any, stub: ClearMLStub, *job_ids: str) -> bool:
    for job_id in job_ids:
        tasks = [t for t in stub.tasks.values() if f"kiln-job:{job_id}" in t.get("system_tags", [])]
        if not tasks or tasks[0]["status"] != "completed":
            return False
    return await drained(js)


async def test_requests_carry_the_job_to_clearml(nats_server, clearml, tmp_path):
    model = tmp_path / "best.pt"
    model.write_bytes(b"weights" * 100)
    events = job_events("job-s1", model)
    async with forwarder(nats_server.url, clearml) as js:
        await publish(js, events)
        await js.publish(subjects.event("vision", "job-s1", "status"), b"{not json")  # poison
        assert await wait_for(lambda: _completed(js, clearml, "job-s1"))
        task = _task_of(clearml, "job-s1")
        tid = task["id"]
        create = clearml.calls("tasks.create")[0].body
        assert (create["name"], create["type"], create["tags"]) == ("job-s1", "training", ["kiln"])
        assert [c.body["name"] for c in clearml.calls("projects.create")] == ["vision"]
        scalars = clearml.scalars(tid)
        assert {s for s in scalars if s[:2] == ("train", "box_loss")} == EXPECTED
        assert {("metrics", "mAP50(B)", i) for i in (1, 2, 3)} <= {s[:3] for s in scalars}
        assert {("lr", "pg0", i) for i in (1, 2, 3)} <= {s[:3] for s in scalars}
        assert ("Epoch Time", "Epoch Time", 2, 0.5) in scalars
        logs = {e["msg"]: e for e in clearml.events(tid, "log")}
        assert logs["Epoch 1/3 loading"]["level"] == "info" and logs["oops"]["level"] == "warning"
        assert any(m.startswith("[kiln] job completed") for m in logs)
        params = {k: v["value"] for k, v in task["hyperparams"]["Kiln"].items()}
        assert params["epochs"] == "3" and params["runner"] == "r1" and params["pid"] == "42"
        # the final model: uploaded to the files server, registered as the task's output model
        upload = next(c.body for c in clearml.calls("files.upload"))
        assert upload["size"] > model.stat().st_size
        (model_row,) = clearml.models.values()
        assert model_row["name"] == "best.pt" and model_row["task"] == tid and model_row["uri"].startswith(clearml.url)
        assert task["models"]["output"] == [{"name": "best.pt", "model": model_row["id"]}]
        # the order a ClearML user sees: created, started, reported, completed last
        order = [c.endpoint for c in clearml.requests if c.endpoint.startswith(("tasks.", "events."))]
        assert order.index("tasks.create") < order.index("tasks.started") < order.index("events.add_batch")
        assert [e for e in order if e.startswith("tasks.")][-1] == "tasks.completed"
        assert task["status_reason"] == "completed"
        rec = await task_record(js, "job-s1")
        assert rec and rec["task_id"] == tid and rec["status"] == "completed"
        dlq = await js.get_last_msg("KILN_DLQ", subjects.dlq("clearml-forwarder-events"))
        assert dlq.data == b"{not json"

        # redelivered / republished copies: no second task, no second copy of anything
        sent = len(clearml.events(tid))
        await publish(js, events, copy="-again")
        assert await wait_for(lambda: drained(js))
        await asyncio.sleep(0.2)
        assert len(clearml.calls("tasks.create")) == 1 and len(clearml.events(tid)) == sent


async def test_server_down_at_first_then_catch_up(nats_server, clearml, tmp_path):
    model = tmp_path / "best.pt"
    model.write_bytes(b"w" * 300)
    clearml.stop()
    async with forwarder(nats_server.url, clearml) as js:
        await publish(js, job_events("job-down", model))
        await asyncio.sleep(1.5)  # several failed tries: nothing may be acked, no task mapped
        assert not await drained(js) and await task_record(js, "job-down") is None
        clearml.start()
        assert await wait_for(lambda: _completed(js, clearml, "job-down"), timeout=20)
        tid = _task_of(clearml, "job-down")["id"]
        assert {s for s in clearml.scalars(tid) if s[:2] == ("train", "box_loss")} == EXPECTED
        assert {"Epoch 1/3 loading", "oops"} <= {e["msg"] for e in clearml.events(tid, "log")}
        assert len(clearml.calls("tasks.create")) == 1 and len(clearml.models) == 1


async def test_slow_server_then_catch_up_without_a_second_task(nats_server, clearml, tmp_path):
    """The server is slow to write: it does the work but answers later than the client waits, so the client times
    out and retries; the task its timed-out create made is found again by the job's tag, not made twice."""
    model = tmp_path / "best.pt"
    model.write_bytes(b"w" * 300)
    clearml.delay_s, clearml.delay_if = 1.2, lambda endpoint: endpoint in ("tasks.create", "events.add_batch")
    async with forwarder(nats_server.url, clearml, call_timeout_s=0.5) as js:
        await publish(js, job_events("job-slow", model))
        assert await wait_for(lambda: _status(clearml, "job-slow", "created"), timeout=10)
        await asyncio.sleep(1.0)
        assert not await drained(js)
        clearml.delay_s = 0.0
        assert await wait_for(lambda: _completed(js, clearml, "job-slow"), timeout=20)
        tid = _task_of(clearml, "job-slow")["id"]
        assert len(clearml.calls("tasks.create")) == 1
        assert {s for s in clearml.scalars(tid) if s[:2] == ("train", "box_loss")} == EXPECTED


async def test_one_failing_job_does_not_hold_up_another(nats_server, clearml, tmp_path):
    model = tmp_path / "best.pt"
    model.write_bytes(b"w" * 300)
    clearml.fail_if = lambda endpoint, body: endpoint == "tasks.create" and body.get("name") == "job-bad"
    async with forwarder(nats_server.url, clearml) as js:
        await publish(js, job_events("job-bad", model))
        await publish(js, job_events("job-good", model))
        assert await wait_for(lambda: _status(clearml, "job-good", "completed"), timeout=15)
        assert not [t for t in clearml.tasks.values() if t["name"] == "job-bad"]
        clearml.fail_if = None
        assert await wait_for(lambda: _completed(js, clearml, "job-bad", "job-good"), timeout=20)
        assert {s for s in clearml.scalars(_task_of(clearml, "job-bad")["id"])
                if s[:2] == ("train", "box_loss")} == EXPECTED


async def _status(stub: ClearMLStub, job_id: str, status: str) -> bool:
    return any(f"kiln-job:{job_id}" in t.get("system_tags", []) and t["status"] == status for t in stub.tasks.values())
