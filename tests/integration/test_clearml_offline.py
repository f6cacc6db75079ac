"""ClearML forwarder in ClearML's offline mode: real nats-server, the forwarder's run() in-process, and the
offline session folder ClearML writes (``$CLEARML_CACHE_DIR/offline/<task id>/``) as the thing checked."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import nats
import pytest

from kiln_clearml_forwarder.main import run
from kiln_clearml_forwarder.settings import Settings
from kiln_contracts import Event, LogBatch, LogLine, streams

from kiln_testing.clearml_stub import ClearMLStub, clearml_env, drained, job_events, publish, task_record, wait_for

# ClearML's bundled pyhocon uses pyparsing names deprecated in pyparsing 3.3
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture()
def offline(tmp_path_factory: pytest.TempPathFactory):
    env = clearml_env(tmp_path_factory.getbasetemp() / "clearml")
    yield env
    from clearml import Task

    stub = ClearMLStub(env["port"])  # leaving offline mode logs in to the configured server
    try:
        stub.start()
    except OSError:  # the stub tests' server is up on that port already
        stub = None
    try:
        Task.set_offline(False)  # process-wide: give the other ClearML tests their server back
    finally:
        if stub:
            stub.stop()


def _read(folder: Path) -> list[dict[str, Any]]:
    """Every report ClearML wrote into the session (metrics.jsonl holds one JSON list a line)."""
    out: list[dict[str, Any]] = []
    for name in ("metrics.jsonl", "log.jsonl"):
        f = folder / name
        if f.exists():
            for line in f.read_text().splitlines():
                if line.strip():
                    data = json.loads(line)
                    out += data if isinstance(data, list) else [data]
    return out


def _sessions_of(cache: Path, job_id: str) -> list[Path]:
    found = []
    for tj in (cache / "offline").glob("offline-*/task.json"):
        if f"kiln-job:{job_id}" in json.loads(tj.read_text()).get("tags", []):
            found.append(tj.parent)
    return found


async def test_offline_session_holds_scalars_logs_params_and_model(nats_server, offline, tmp_path):
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await streams.ensure_streams(js)
    settings = Settings(enabled=True, offline=True, nats_url=nats_server.url, fetch_ms=50, linger_s=0.3,
                        backoff_initial_s=0.1)
    model = tmp_path / "best.pt"
    model.write_bytes(b"weights" * 100)
    events = job_events("job-off", model)
    stop = asyncio.Event()
    forwarder = asyncio.create_task(run(settings, stop))
    try:
        await publish(js, events)
        assert await wait_for(lambda: _done(js, "job-off"))
        rec = await task_record(js, "job-off")
        assert rec and rec["status"] == "completed" and rec["task_id"].startswith("offline-")
        folder = offline["cache_dir"] / "offline" / rec["task_id"]
        reports = _read(folder)
        scalars = {(r["metric"], r["variant"], r["iter"]): r["value"] for r in reports
                   if r["type"] == "training_stats_scalar"}
        assert {k: v for k, v in scalars.items() if k[:2] == ("train", "box_loss")} == {
            ("train", "box_loss", 1): 1.0, ("train", "box_loss", 2): 0.5, ("train", "box_loss", 3): 1 / 3}
        assert {("metrics", "mAP50(B)", i) for i in (1, 2, 3)} <= set(scalars)
        assert {("lr", "pg0", i) for i in (1, 2, 3)} <= set(scalars)
        assert ("Epoch Time", "Epoch Time", 3) in scalars
        logs = [r["msg"] for r in reports if r["type"] == "log"]
        assert "Epoch 1/3 loading" in logs and "oops" in logs
        assert any("job completed" in m for m in logs)
        task_json = json.loads((folder / "task.json").read_text())
        assert task_json["project_name"] == "vision" and task_json["name"] == "job-off"
        assert {"kiln", "kiln-job:job-off"} <= set(task_json["tags"])
        params = {k: v["value"] for k, v in task_json["hyperparams"]["Kiln"].items()}
        assert params["epochs"] == "3" and params["runner"] == "r1" and params["dataset"] == "/data/coco8"
        arts = {a["key"]: a for a in task_json["execution"]["artifacts"]}
        assert arts["best.pt"]["content_size"] == model.stat().st_size

        # The same events again (new Nats-Msg-Ids, so the stream stores them twice): no second task, no copies.
        await publish(js, events, copy="-again")
        assert await wait_for(lambda: drained(js))
        assert _sessions_of(offline["cache_dir"], "job-off") == [folder]
        assert len([r for r in _read(folder) if r.get("variant") == "box_loss"]) == 3

        # A restart: the job -> task map brings a late log batch to the same task.
        stop.set()
        await asyncio.wait_for(forwarder, 15)
        stop = asyncio.Event()
        forwarder = asyncio.create_task(run(settings, stop))
        late = Event.new(job_id="job-off", project="vision", attempt=1, seq=9, source="runner",
                         data=LogBatch(lines=[LogLine(text="late line after restart")]))
        await publish(js, [late])
        assert await wait_for(lambda: _has_log(folder, "late line after restart"))
        assert await wait_for(lambda: drained(js))
        assert _sessions_of(offline["cache_dir"], "job-off") == [folder]
    finally:
        stop.set()
        await asyncio.wait_for(forwarder, 15)
        await nc.close()


async def _done(js: Any, job_id: str) -> bool:
    rec = await task_record(js, job_id)
    return bool(rec and rec.get("status") == "completed") and await drained(js)


async def _has_log(folder: Path, text: str) -> bool:
    return any(r.get("msg") == text for r in _read(folder))
