"""Bad input through the real REST API (real NATS JetStream, SQLite): every one answers 4xx with a reason, never
500, and nothing that the trainer would refuse is accepted."""

import pytest
from kiln_testing.api import api_client


SPEC = '{"model": "yolov8n.yaml", "dataset": "/data/shapes", "train": {%s}}'


@pytest.fixture()
def client(nats_server, tmp_path):
    with api_client(tmp_path, nats_url=nats_server.url, raise_server_exceptions=False) as c:
        yield c


def post_raw(client, train: str):
    return client.post("/api/v1/jobs", content=SPEC % train, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("train, field, words", [
    ('"lr0": 1e400', "lr0", "finite number"),
    ('"batch": NaN', "batch", "valid integer"),
    ('"scale": 1e400', "scale", "finite number"),
    ('"momentum": -Infinity', "momentum", "finite number"),
    ('"epochs": 1e400', "epochs", "valid integer"),
])
def test_non_finite_numbers_are_422_not_500(client, train, field, words):
    r = post_raw(client, train)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert any(d["loc"][-1] == field and words in d["msg"] for d in detail), detail
    assert client.get("/api/v1/jobs").json() == []  # nothing stored


@pytest.mark.parametrize("train, field, words", [
    ('"seed": 1000000000000000000000000000000', "seed", "less than or equal to 4294967295"),
    ('"seed": 4294967296', "seed", "less than or equal to 4294967295"),
    ('"scale": 1.5', "scale", "less than or equal to 1"),
    ('"patience": 100000000', "patience", "less than or equal to 10000"),
    ('"epochs": "2"', "epochs", "valid integer"),
    ('"epochs": true', "epochs", "valid integer"),
    ('"epochs": 2.5', "epochs", "valid integer"),
    ('"amp": "yes"', "amp", "valid boolean"),
    ('"amp": 1', "amp", "valid boolean"),
    ('"lr0": "0.1"', "lr0", "valid number"),
])
def test_numbers_are_bounded_and_strictly_typed(client, train, field, words):
    r = post_raw(client, train)
    assert r.status_code == 422, r.text
    assert any(d["loc"][-1] == field and words in d["msg"] for d in r.json()["detail"]), r.json()


def test_the_largest_valid_values_are_accepted(client):
    r = post_raw(client, '"seed": 4294967295, "scale": 1, "lr0": 1')
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["train"]["seed"] == 4294967295


@pytest.mark.parametrize("model", ["http://example.com/yolov8n.pt", "https://x/y.yaml", "s3://bucket/m.pt",
                                   "//host/share/m.pt"])
def test_a_model_url_is_422(client, model):
    r = client.post("/api/v1/jobs", json={"model": model, "dataset": "/data/shapes"})
    assert r.status_code == 422
    assert any(d["loc"][-1] == "model" and "not a URL" in d["msg"] for d in r.json()["detail"]), r.json()


@pytest.mark.parametrize("offset", ["9223372036854775808", "2147483648", "-1", "x"])
def test_list_offset_is_bounded(client, offset):
    r = client.get("/api/v1/jobs", params={"offset": offset})
    assert r.status_code == 422, r.text
    assert any(d["loc"][-1] == "offset" for d in r.json()["detail"])


def test_a_job_cancelled_before_it_started_cannot_be_started(client):
    job = client.post("/api/v1/jobs", content=SPEC % '"epochs": 1',
                      headers={"Content-Type": "application/json"}).json()
    assert job["status"] == "created"
    assert client.post(f"/api/v1/jobs/{job['id']}/cancel").status_code == 202
    r = client.post(f"/api/v1/jobs/{job['id']}/start")
    assert r.status_code == 409 and "cancelled" in r.json()["detail"]
    timeline = [t["status"] for t in client.get(f"/api/v1/jobs/{job['id']}").json()["timeline"]]
    assert "queued" not in timeline


@pytest.mark.parametrize("body, ctype", [(b"\xff\xfe{", "text/plain"), (b"\xff{", "application/json"),
                                         (b"{", "application/json")])
def test_a_body_that_is_not_json_is_4xx_not_500(client, body, ctype):
    r = client.post("/api/v1/jobs", content=body, headers={"Content-Type": ctype})
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["detail"]
