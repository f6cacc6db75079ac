"""Metric history of a long run through the REST API: 100,000 steps, downsampled with min/max buckets, on SQLite
and PostgreSQL."""

import asyncio
import time
from datetime import datetime, timezone

import pytest
from sqlalchemy import insert

from kiln_store import make_engine, metric_events, upgrade
from kiln_testing.api import api_client

SPEC = {"model": "yolov8n.yaml", "dataset": "/data/shapes", "train": {"epochs": 3, "imgsz": 64}}
STEPS = 100_000
SPIKE, DIP = (31_337, 100.0), (66_666, -100.0)


def _loss(step: int) -> float:
    return {SPIKE[0]: SPIKE[1], DIP[0]: DIP[1]}.get(step, 1.0 / (1 + step / 1000) + (step % 7) * 0.001)


async def _insert(db_url: str, job_id: str) -> None:
    engine = make_engine(db_url)
    await upgrade(engine)
    now = datetime.now(timezone.utc)
    rows = [{"event_id": f"e{s}", "job_id": job_id, "attempt": 1, "kind": "metrics", "step": s, "time": now,
             "values": {"train/loss": _loss(s), **({"lr": 0.01} if s % 200 == 0 else {})}} for s in range(STEPS)]
    rows.append({"event_id": "retry", "job_id": job_id, "attempt": 2, "kind": "metrics", "step": 0, "time": now,
                 "values": {"lr": 0.02}})  # a later attempt's value wins for its step (its train/loss is kept)
    async with engine.begin() as conn:
        for i in range(0, len(rows), 10_000):
            await conn.execute(insert(metric_events), rows[i : i + 10_000])
    await engine.dispose()


@pytest.fixture()
def client(nats_server, db_url, tmp_path):
    with api_client(tmp_path, nats_url=nats_server.url, database_url=db_url, sweep_interval_s=3600) as c:
        yield c


def test_a_100k_step_series_comes_back_downsampled_with_its_extremes(client, db_url):
    job = client.post("/api/v1/jobs", json=SPEC).json()
    asyncio.run(_insert(db_url, job["id"]))
    url = f"/api/v1/jobs/{job['id']}/metrics"

    t0 = time.perf_counter()
    r = client.get(url, params={"keys": "train/loss,lr", "max_points": 1000})
    elapsed = time.perf_counter() - t0
    assert r.status_code == 200
    loss, lr = r.json()["series"]["train/loss"], r.json()["series"]["lr"]
    assert loss["downsampled"] is True and loss["total_points"] == STEPS
    assert 900 <= len(loss["steps"]) <= 1000 and len(loss["steps"]) == len(loss["values"])
    assert loss["steps"] == sorted(set(loss["steps"]))
    assert (loss["steps"][0], loss["steps"][-1]) == (0, STEPS - 1)
    pairs = set(zip(loss["steps"], loss["values"], strict=True))
    assert SPIKE in pairs and DIP in pairs
    assert lr["downsampled"] is False and len(lr["steps"]) == lr["total_points"] == STEPS // 200
    assert lr["values"][0] == 0.02
    assert len(r.content) < 60_000, len(r.content)
    assert elapsed < 5.0, f"{elapsed:.2f}s for a 100k-step series"  # about 0.3-0.6 s here; loose for busy CI

    default = client.get(url, params={"keys": "train/loss"}).json()["series"]["train/loss"]
    assert default["downsampled"] and len(default["steps"]) <= 2000

    full = client.get(url, params={"keys": "train/loss", "max_points": 0}).json()["series"]["train/loss"]
    assert not full["downsampled"] and len(full["steps"]) == STEPS and full["values"][SPIKE[0]] == SPIKE[1]

    assert client.get(url, params={"max_points": 5}).status_code == 422
    print(f"100k-step series, {len(r.content)} bytes in {elapsed * 1000:.0f} ms")
