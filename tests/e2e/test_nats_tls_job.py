"""A whole job on a bus with JWT identities and mutual TLS: the bundled nats-server verifies every client's
certificate (test CA), every service and the trainer connect with theirs, a real YOLO training reports live, and a
client with another CA's certificate (or none) is refused."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import httpx
import nats
import pytest
from test_pipeline import TRAIN, wait_status

from kiln_contracts.natsauth.client import NatsTls
from kiln_local.bus import BusTls
from kiln_local.stack import Stack, StackConfig, free_port
from kiln_local.synth import make_detection_dataset
from kiln_testing.natsauth import make_ca, observer_options

pytestmark = pytest.mark.e2e


async def _connect(url: str, tls: ssl.SSLContext, **options: str) -> str:
    async def quiet(exc: Exception) -> None:
        pass

    try:
        nc = await nats.connect(url, tls=tls, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=3,
                                error_cb=quiet, **options)
    except Exception as exc:  # noqa: BLE001 - a refused handshake surfaces as several exception types
        return f"refused: {exc!r}"
    await nc.close()
    return "connected"


def test_a_job_end_to_end_over_mutual_tls_with_identities(tmp_path: Path) -> None:
    ca, rogue = make_ca(tmp_path / "ca"), make_ca(tmp_path / "rogue", "rogue-ca")
    dataset = make_detection_dataset(tmp_path / "ds", n_train=16, n_val=8, imgsz=64)
    tls = BusTls(ca.server_tls(), NatsTls(ca.root / "ca.pem", ca.root / "client.pem", ca.root / "client-key.pem"))
    cfg = StackConfig(data_dir=tmp_path / "kiln", api_port=free_port(), notifier_port=free_port(),
                      nats_port=free_port(), nats_tls=tls, extra_env={"KILN_RUNNER_DATA_ROOTS": str(tmp_path)})
    with Stack(cfg) as stack:
        assert stack.nats_url.startswith("tls://")
        headers = {"Authorization": f"Bearer {stack.owner_key()}"}
        with httpx.Client(base_url=stack.api_url, headers=headers, timeout=10) as api:
            r = api.post("/api/v1/jobs", json={"model": "yolov8n.yaml", "dataset": str(dataset), "train": TRAIN,
                                                "start": True})
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
            job = wait_status(api, job_id, {"completed", "failed", "cancelled", "lost"}, timeout=120)
            assert job["status"] == "completed", job
            metrics = api.get(f"/api/v1/jobs/{job_id}/metrics").json()
            assert metrics, "no metrics stored"
            lines = [line["text"] for line in api.get(f"/api/v1/jobs/{job_id}/logs").json()]
        # The trainer published live over TLS with its own creds: nothing went to its spool for the runner.
        assert not [ln for ln in lines if "spooling to" in ln or "cannot connect to NATS" in ln], lines[-20:]

        observer = observer_options(stack.bus.chain)
        assert asyncio.run(_connect(stack.nats_url, ca.client_context(), **observer)) == "connected"
        assert asyncio.run(_connect(stack.nats_url, ca.client_context(None), **observer)).startswith("refused")
        stranger = ssl.create_default_context(cafile=str(ca.root / "ca.pem"))
        stranger.load_cert_chain(str(rogue.root / "client.pem"), str(rogue.root / "client-key.pem"))
        assert asyncio.run(_connect(stack.nats_url, stranger, **observer)).startswith("refused")
        assert "certificate" in (stack.data_dir / "logs" / "nats.log").read_text().lower()
