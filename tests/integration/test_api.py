"""REST API against real NATS JetStream and SQLite: validation, 404/409, start publishes, cancel of a queued job."""

import asyncio

import nats
import pytest

from kiln_contracts import StartJob, streams
from kiln_testing.api import api_client

SPEC = {"model": "yolov8n.yaml", "dataset": "/data/shapes", "train": {"epochs": 3, "imgsz": 64}}


@pytest.fixture()
def client(nats_server, tmp_path):
    with api_client(tmp_path, nats_url=nats_server.url) as c:
        yield c


def test_health_and_docs(client):
    assert client.get("/healthz").json() == {"status": "ok", "nats": True}
    assert client.get("/docs").status_code == 200
    assert "/api/v1/jobs" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("body, field, words", [
    ({**SPEC, "train": {"epochs": -1}}, "epochs", "greater than or equal to 1"),
    ({**SPEC, "train": {"lr00": 0.1}}, "lr00", "Extra inputs are not permitted"),
    ({k: v for k, v in SPEC.items() if k != "dataset"}, "dataset", "Field required"),
    ({**SPEC, "dataset": "  "}, "dataset", "dataset is required"),
    ({**SPEC, "model": "yolov8n"}, "model", "model YAML"),
    ({**SPEC, "train": {"imgsz": 100}}, "imgsz", "multiple of 32"),
])
def test_invalid_config_is_422_with_a_reason(client, body, field, words):
    r = client.post("/api/v1/jobs", json=body)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert any(field in [str(x) for x in d["loc"]] and words in d["msg"] for d in detail), detail


def test_unknown_job_is_404(client):
    for method, path in (("get", "/api/v1/jobs/nope"), ("get", "/api/v1/jobs/nope/metrics"),
                         ("get", "/api/v1/jobs/nope/logs"), ("post", "/api/v1/jobs/nope/start"),
                         ("post", "/api/v1/jobs/nope/cancel")):
        r = getattr(client, method)(path)
        assert r.status_code == 404 and "not found" in r.json()["detail"]


def test_start_publishes_one_command_and_refuses_a_second_start(client, nats_server):
    job = client.post("/api/v1/jobs", json=SPEC).json()
    assert job["status"] == "created" and job["attempt"] == 0
    r = client.post(f"/api/v1/jobs/{job['id']}/start")
    assert r.status_code == 202 and r.json()["status"] == "queued"
    assert client.post(f"/api/v1/jobs/{job['id']}/start").status_code == 409

    async def read_commands():
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        sub = await js.pull_subscribe("kiln.cmd.start.default", durable="t", stream=streams.JOBS.name)
        msgs = await sub.fetch(10, timeout=1)
        await nc.close()
        return msgs

    msgs = asyncio.run(read_commands())
    assert len(msgs) == 1
    cmd = StartJob.model_validate_json(msgs[0].data)
    assert (cmd.job_id, cmd.attempt, cmd.spec.train.epochs) == (job["id"], 1, 3)
    assert msgs[0].headers["Nats-Msg-Id"] == f"{job['id']}:1"
    listed = client.get("/api/v1/jobs", params={"status": "queued"}).json()
    assert [j["id"] for j in listed] == [job["id"]]
    assert client.get("/api/v1/jobs", params={"status": "running"}).json() == []
    assert client.get("/api/v1/jobs", params={"status": "bogus"}).status_code == 422


def test_rerun_creates_a_new_job_from_the_recorded_spec_and_cancel_of_a_queued_job(client):
    job = client.post("/api/v1/jobs", json={**SPEC, "start": True}).json()
    rerun = client.post(f"/api/v1/jobs/{job['id']}/rerun")
    assert rerun.status_code == 201
    body = rerun.json()
    assert body["id"] != job["id"] and body["rerun_of"] == job["id"] and body["spec"] == job["spec"]
    assert body["status"] == "queued"
    r = client.post(f"/api/v1/jobs/{body['id']}/cancel")
    assert r.status_code == 202
    # the API publishes the end of a queued job itself; no writer runs here, so read the bus
    async def finished_events():
        nc = await nats.connect(client.app.state.settings.nats_url)
        sub = await nc.jetstream().subscribe(f"kiln.evt.*.{body['id']}.finished", ordered_consumer=True)
        msg = await sub.next_msg(timeout=5)
        await nc.close()
        return msg
    from kiln_contracts import Event
    ev = Event.model_validate_json(asyncio.run(finished_events()).data)
    assert ev.data.status.value == "cancelled" and ev.source == "api"
