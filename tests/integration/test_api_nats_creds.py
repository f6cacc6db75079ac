"""The API's own NATS identity: with KILN_API_NATS_CREDS_FILE it connects with its creds and inbox prefix, checks
its streams instead of creating them, and does all of its work without one permission violation.

A real nats-server in operator mode with the generated configuration (tests/kiln_testing/natsauth.py)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from nats.js.errors import NotFoundError

from kiln_api.adapters.bus import NotProvisioned
from kiln_api.settings import Settings
from kiln_contracts import streams, subjects
from kiln_contracts.natsauth.provision import provision
from kiln_testing.api import api_client
from kiln_testing.natsauth import AuthNats, auth_nats, client

SPEC = {"model": "yolov8n.yaml", "dataset": "/data/shapes", "project": "default"}


def _violations(server: AuthNats) -> list[str]:
    return [line for line in server.log().splitlines() if "Violation" in line]


@pytest.fixture()
def provisioned(tmp_path):
    with auth_nats(tmp_path / "nats") as server:
        async def prepare() -> None:
            prov = await client(server, "provisioner")
            await provision(prov.js)
            await prov.close()

        asyncio.run(prepare())
        yield server


def test_the_api_works_with_its_own_creds_and_nothing_is_refused(provisioned: AuthNats, tmp_path) -> None:
    with api_client(tmp_path, nats_url=provisioned.url, nats_creds_file=provisioned.creds("api")) as owner:
        assert owner.get("/healthz").json() == {"status": "ok", "nats": True}
        job = owner.post("/api/v1/jobs", json=SPEC | {"start": True})
        assert job.status_code == 201, job.text
        job_id = job.json()["id"]
        assert owner.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 202
        audited = owner.get("/api/v1/audit").json()
        assert {"job_created", "job_started", "job_cancelled"} <= {r["action"] for r in audited}

    async def stored() -> dict[str, object]:
        prov = await client(provisioned, "provisioner")
        js = prov.js
        start = await js.get_last_msg(streams.JOBS.name or "", subjects.start("default"))
        events = [json.loads((await js.get_last_msg(streams.EVENTS.name or "",
                                                    subjects.event("default", job_id, "status"))).data),
                  json.loads((await js.get_last_msg(streams.EVENTS.name or "",
                                                    subjects.event("default", job_id, "finished"))).data)]
        mark = await (await js.key_value(streams.CLAIMS_BUCKET)).get(streams.cancel_key(job_id))
        audit = await js.stream_info(streams.AUDIT.name or "")
        await prov.close()
        return {"start": json.loads(start.data)["job_id"], "events": [e["data"]["status"] for e in events],
                "mark": bool(mark.value), "audit": audit.state.messages}

    got = asyncio.run(stored())
    assert got["start"] == job_id and got["events"] == ["queued", "cancelled"] and got["mark"], got
    assert got["audit"] >= 3  # created, started, cancelled: published by the API itself, not by the sweeper
    assert _violations(provisioned) == []


def test_the_api_checks_its_streams_and_names_the_provisioning_step(tmp_path) -> None:
    with auth_nats(tmp_path / "nats") as server:
        with pytest.raises(NotProvisioned) as err:
            with api_client(tmp_path, nats_url=server.url, nats_creds_file=server.creds("api"), streams_wait_s=0):
                pass
        text = str(err.value)
        assert "KILN_JOBS" in text and "provisioning step" in text and "provision(" in text

        async def untouched() -> None:  # the API created nothing (and was not allowed to)
            prov = await client(server, "provisioner")
            with pytest.raises(NotFoundError):
                await prov.js.stream_info(streams.EVENTS.name or "")
            await prov.close()

        asyncio.run(untouched())
        assert _violations(server) == []  # it checked with STREAM.INFO only, which it may do


def test_the_api_waits_for_the_provisioning_step(tmp_path) -> None:
    """Started before the provisioner has run (a deploy that starts everything at once), it waits, then works."""
    with auth_nats(tmp_path / "nats") as server:
        def provision_later() -> None:
            time.sleep(1.0)

            async def run() -> None:
                prov = await client(server, "provisioner")
                await provision(prov.js)
                await prov.close()

            asyncio.run(run())

        later = threading.Thread(target=provision_later)
        later.start()
        t0 = time.monotonic()
        with api_client(tmp_path, nats_url=server.url, nats_creds_file=server.creds("api"), streams_wait_s=30) as owner:
            waited = time.monotonic() - t0
            assert owner.post("/api/v1/jobs", json=SPEC | {"start": True}).status_code == 201
        later.join()
        assert 1.0 <= waited < 10, waited
        assert _violations(server) == []


def test_the_default_inbox_prefix_is_the_roles_and_partial_settings_are_refused(tmp_path) -> None:
    from kiln_contracts.natsauth.permissions import api

    assert api().inbox == "_INBOX.api"
    creds = tmp_path / "api.creds"
    creds.write_text("not read here")
    with pytest.raises(ValueError, match="nats_trust_dir needs nats_creds_file"):
        Settings(nats_trust_dir=tmp_path)
    with pytest.raises(ValueError, match="need nats_trust_dir"):
        Settings(nats_creds_file=creds, nats_account="A" * 56)
    with pytest.raises(ValueError, match="nats_creds_file"):  # a creds file that is not there: at once
        Settings(nats_creds_file=tmp_path / "missing.creds")
    s = Settings(nats_url="nats://a:4222", nats_public_url="nats://x:4222, tls://y:4222")
    assert s.nats_public_urls == ["nats://x:4222", "tls://y:4222"]
    assert Settings(nats_url="nats://a:4222").nats_public_urls == ["nats://a:4222"]
