"""The whole path on real parts: `kiln up` stack (bundled nats-server, real service processes), REST, a real
2-epoch YOLO training in a subprocess, metrics in SQLite/PostgreSQL, a real WebSocket client."""

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
import websockets
from sqlalchemy import select

from kiln_local.stack import Stack, StackConfig, free_port
from kiln_local.synth import make_detection_dataset
from kiln_store import make_engine, metric_events
from kiln_testing.natsauth import observer_options

pytestmark = pytest.mark.e2e
DOCS = Path(__file__).resolve().parents[2] / "docs"
TRAIN = {"epochs": 2, "imgsz": 64, "batch": 8, "nbs": 8, "workers": 0, "warmup_epochs": 0, "seed": 0}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_detection_dataset(tmp_path_factory.mktemp("ds") / "shapes", n_train=16, n_val=8, imgsz=64)


@pytest.fixture()
def stack(tmp_path, db_url, dataset):
    cfg = StackConfig(data_dir=tmp_path / "kiln", api_port=free_port(), notifier_port=free_port(),
                      nats_port=free_port(), db_url=db_url,
                      extra_env={"KILN_RUNNER_DATA_ROOTS": str(dataset.parent)})
    with Stack(cfg) as s:
        yield s


def assert_valid_against_the_published_schemas(events: list[dict]) -> None:
    """Every event of a real run validates with a standard JSON Schema validator against both published documents:
    docs/events.schema.json on its own, and the Event schema inside docs/asyncapi.json."""
    from jsonschema import Draft202012Validator

    standalone = json.loads((DOCS / "events.schema.json").read_text())
    asyncapi = json.loads((DOCS / "asyncapi.json").read_text())
    validators = [Draft202012Validator(standalone),
                  Draft202012Validator({**asyncapi, "$ref": "#/components/schemas/Event"})]
    for v in validators:
        for ev in events:
            v.validate(ev)
    kinds = {ev["data"]["kind"] for ev in events}
    assert kinds >= {"status", "heartbeat", "progress", "metrics", "epoch", "artifact", "log", "finished"}, kinds
    bad = dict(events[0], data={**events[0]["data"], "kind": "no-such-kind"})
    assert not all(v.is_valid(bad) for v in validators)  # the schemas do reject what is not an event


def wait_status(api: httpx.Client, job_id: str, want: set[str], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    job = {}
    while time.monotonic() < deadline:
        job = api.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in want:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} stayed {job.get('status')}")


async def collect_until_finished(ws_url: str, job_id: str, ticket: str, timeout: float = 180) -> list[dict]:
    received = []
    async with websockets.connect(f"{ws_url}/api/v1/ws/jobs/{job_id}?heartbeats=true", max_size=None,
                                  subprotocols=["kiln.v1", f"kiln.ticket.{ticket}"]) as ws:
        async with asyncio.timeout(timeout):
            async for raw in ws:
                msg = json.loads(raw)
                if msg.get("type") != "event":
                    continue
                received.append(msg)
                if msg["event"]["data"]["kind"] == "finished":
                    return received
    raise AssertionError("socket closed before the job finished")


@pytest.fixture()
def api(stack):
    with httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {stack.owner_key()}"},
                      timeout=10) as client:
        yield client


def test_rest_to_training_to_db_to_websocket(stack, api, dataset, db_url):
    r = api.post("/api/v1/jobs", json={"name": "e2e", "model": "yolov8n.yaml", "dataset": str(dataset),
                                       "train": TRAIN})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    assert r.json()["status"] == "created"

    async def scenario():
        ticket = api.post("/api/v1/ws-tickets", json={"jobs": [job_id]}).json()["ticket"]
        watcher = asyncio.create_task(collect_until_finished(stack.ws_url, job_id, ticket))
        await asyncio.sleep(0.3)  # the client is subscribed before the job starts: everything arrives live
        async with httpx.AsyncClient(base_url=stack.api_url, headers=api.headers) as client:
            started = await client.post(f"/api/v1/jobs/{job_id}/start", timeout=10)
        assert started.status_code == 202, started.text
        return await watcher

    received = asyncio.run(scenario())
    kinds = [m["event"]["data"]["kind"] for m in received]
    assert_valid_against_the_published_schemas([m["event"] for m in received])
    epochs = [m["event"]["data"]["epoch"] for m in received if m["event"]["data"]["kind"] == "epoch"]
    assert epochs == [1, 2], kinds
    statuses = [m["event"]["data"]["status"] for m in received if m["event"]["data"]["kind"] in ("status", "finished")]
    assert statuses == ["queued", "starting", "running", "completed"], statuses
    seqs = [m["seq"] for m in received if m["stream"] == "events"]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    first_epoch = next(m["event"]["data"] for m in received if m["event"]["data"]["kind"] == "epoch")
    for key in ("train/box_loss", "train/cls_loss", "metrics/mAP50(B)", "metrics/mAP50-95(B)", "lr/pg0"):
        assert key in first_epoch["metrics"], key

    job = wait_status(api, job_id, {"completed"}, timeout=30)
    assert job["exit_code"] == 0 and job["epoch"] == 2
    assert [t["status"] for t in job["timeline"]] == ["queued", "starting", "running", "completed"]

    deadline = time.monotonic() + 10
    while True:  # the writer may commit the last batch a moment after the status
        rows = api.get(f"/api/v1/jobs/{job_id}/epochs").json()
        if len(rows) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert "metrics/mAP50(B)" in rows[1]["metrics"]
    series = api.get(f"/api/v1/jobs/{job_id}/metrics", params={"keys": "train/box_loss"}).json()["series"]
    assert series["train/box_loss"]["steps"] == [1, 2]
    logs = api.get(f"/api/v1/jobs/{job_id}/logs", params={"tail": 10000}).json()
    assert logs and any("kiln" in line["text"].lower() or "epoch" in line["text"].lower() for line in logs)

    async def rows_in_db():  # straight from the database, not through the API
        engine = make_engine(db_url)
        async with engine.connect() as conn:
            res = await conn.execute(select(metric_events.c.step, metric_events.c["values"]).where(
                metric_events.c.job_id == job_id, metric_events.c.kind == "epoch"))
            points: dict[int, int] = {}
            for step, values in res.all():  # one row per epoch event, its points as JSON
                points[step] = points.get(step, 0) + len(values)
            out = sorted(points.items())
        await engine.dispose()
        return out

    per_epoch = asyncio.run(rows_in_db())
    assert [s for s, _ in per_epoch] == [1, 2] and all(n >= 8 for _, n in per_epoch)
    assert_no_secret_anywhere(stack, [stack.owner_key(), *nats_seeds(stack)])


def nats_seeds(stack: Stack) -> list[str]:
    """Every NATS seed of the stack: the signing keys' and each service user's (the line after the JWT in creds)."""
    chain = stack.bus.chain
    keys = [p.read_text().strip() for p in (chain.root / "keys").glob("*.nk")]
    users = [line.strip() for p in (chain.root / "creds").glob("*.creds")
             for line in p.read_text().splitlines() if line.startswith("SU")]
    assert len(keys) >= 6 and len(users) >= 6, (keys, users)
    return keys + users


def assert_no_secret_anywhere(stack: Stack, secrets: list[str]) -> None:
    """After a whole run: no key in any service's log, any stream's messages (events, logs, audit, commands), any
    process's argv, or the supervisord config (which holds every service's environment)."""
    import nats
    import psutil

    haystacks = {str(p): p.read_bytes() for p in (stack.data_dir / "logs").glob("*.log")}
    haystacks["supervisord.conf"] = stack.conf.read_bytes()
    for proc in psutil.Process(stack.supervisord.pid).children(recursive=True):
        try:
            haystacks[f"argv of {proc.pid}"] = " ".join(proc.cmdline()).encode()
        except psutil.Error:
            pass

    async def streams() -> dict[str, bytes]:
        nc = await nats.connect(stack.nats_url, **observer_options(stack.bus.chain))
        js, out = nc.jetstream(), {}
        for name in ("KILN_EVENTS", "KILN_LOGS", "KILN_AUDIT", "KILN_JOBS", "KILN_DLQ"):
            info = await js.stream_info(name)
            data = []
            for seq in range(max(1, info.state.first_seq), info.state.last_seq + 1 if info.state.messages else 1):
                try:
                    msg = await js.get_msg(name, seq)
                except nats.js.errors.NotFoundError:
                    continue
                data.append(msg.data + repr(msg.headers).encode())
            out[name] = b"\n".join(data)
        await nc.close()
        return out

    haystacks |= asyncio.run(streams())
    assert len(haystacks["KILN_EVENTS"]) > 1000 and len(haystacks["KILN_AUDIT"]) > 100
    assert any(name.endswith("api.log") for name in haystacks)
    for secret in secrets:
        leaks = [name for name, data in haystacks.items() if secret.encode() in data]
        assert not leaks, f"a key appears in {leaks}"


def test_missing_dataset_fails_with_the_reason(api, dataset):
    missing = dataset.parent / "no-such-dataset"  # under the runner's data roots: outside them is refused first
    r = api.post("/api/v1/jobs", json={"model": "yolov8n.yaml", "dataset": str(missing), "start": True,
                                       "train": TRAIN})
    assert r.status_code == 201, r.text
    job = wait_status(api, r.json()["id"], {"failed", "completed"}, timeout=60)
    assert job["status"] == "failed"
    assert f"dataset not found: {missing}" in job["reason"]
    assert job["exit_class"] == "user_error"
