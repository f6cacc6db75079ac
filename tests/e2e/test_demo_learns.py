"""`kiln demo` shows a model learning: its dataset, model and training arguments (imported from kiln_local, so they
cannot drift from the demo's) go through the real path (REST -> NATS -> runner -> trainer subprocess -> writer) and
the stored mAP50 rises from nothing to at least 0.5.

Slow on purpose: a real 20-epoch training on the CPU, about 1.5 to 2.5 minutes on 2 cores (docs/performance.md#demo).
Seeded: on one machine the figures repeat exactly; the threshold leaves room for another CPU's rounding.
"""

import time

import httpx
import pytest

from kiln_local.cli import DEMO_TRAIN, demo_job
from kiln_local.stack import Stack, StackConfig, free_port

pytestmark = pytest.mark.e2e
MAP50 = "metrics/mAP50(B)"


def wait_for(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := fn()) is not None:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.timeout(600)
def test_the_demo_training_reaches_map50_of_one_half(tmp_path):
    data_dir = tmp_path / "kiln"
    spec = demo_job(data_dir / "datasets")  # where `kiln demo` writes them too: a runner data root
    assert spec["train"] == DEMO_TRAIN and spec["start"] is True
    cfg = StackConfig(data_dir=data_dir, api_port=free_port(), notifier_port=free_port(), nats_port=free_port(),
                      extra_env={"KILN_RUNNER_DATA_ROOTS": str(data_dir / "datasets")})
    with Stack(cfg) as stack, httpx.Client(base_url=stack.api_url, timeout=30,
                                           headers={"Authorization": f"Bearer {stack.owner_key()}"}) as api:
        r = api.post("/api/v1/jobs", json=spec)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]

        def finished():
            job = api.get(f"/api/v1/jobs/{job_id}").json()
            return job if job["status"] in ("completed", "failed", "cancelled") else None

        job = wait_for(finished, 480, f"job {job_id} to finish")
        assert job["status"] == "completed", job

        def stored():  # the writer may commit the last epoch a moment after the status
            rows = api.get(f"/api/v1/jobs/{job_id}/epochs").json()
            return rows if len(rows) == DEMO_TRAIN["epochs"] else None

        rows = wait_for(stored, 15, "every epoch in the database")
    maps = [row["metrics"][MAP50] for row in rows]
    curve = " ".join(f"{m:.3f}" for m in maps)
    assert [row["epoch"] for row in rows] == list(range(1, DEMO_TRAIN["epochs"] + 1))
    assert maps[0] < 0.1, f"random weights should find next to nothing: {curve}"
    assert maps[-1] >= 0.5, f"the demo's model did not learn enough: mAP50 per epoch {curve}"
    assert min(maps[-3:]) >= 0.5, f"learning should have settled by the end: {curve}"
