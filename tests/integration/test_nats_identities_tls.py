"""The generated server config with its TLS block: mutual TLS and JWT auth together; certificates from a test CA."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import nats
import pytest

from kiln_contracts import subjects
from kiln_contracts.natsauth.provision import provision
from kiln_testing.natsauth import PrivateCA, auth_nats, client, make_ca


async def _refused(url: str, creds: str, tls: ssl.SSLContext) -> str:
    async def quiet(exc: Exception) -> None:
        pass

    try:
        nc = await nats.connect(url, user_credentials=creds, tls=tls, allow_reconnect=False, max_reconnect_attempts=0,
                                connect_timeout=2, error_cb=quiet)
    except Exception as exc:  # noqa: BLE001 - TLS alerts come as several exception types
        return repr(exc)
    await nc.close()
    raise AssertionError("connected")


async def test_services_connect_with_tls_and_creds_and_strangers_are_refused(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    rogue = make_ca(tmp_path / "rogue", "rogue-ca")
    with auth_nats(tmp_path / "bus", ("gpu",), tls=ca.server_tls()) as server:
        assert server.url.startswith("tls://")
        prov = await client(server, "provisioner", tls=ca.client_context())
        await provision(prov.js, ("gpu",))
        await prov.close()
        runner = await client(server, "runner-gpu", tls=ca.client_context())
        ack = await runner.js.publish(subjects.event("p1", "j1", "status"), b"{}")
        assert ack.stream == "KILN_EVENTS" and runner.violations() == []
        await runner.close()

        creds = server.creds("runner-gpu")
        foreign = ssl.create_default_context(cafile=str(ca.root / "ca.pem"))
        foreign.load_cert_chain(str(rogue.root / "client.pem"), str(rogue.root / "client-key.pem"))
        assert await _refused(server.url, creds, foreign)  # client certificate of another CA
        assert await _refused(server.url, creds, ca.client_context(cert=None))  # no client certificate
        assert "CERTIFICATE_VERIFY_FAILED" in await _refused(server.url, creds, rogue.client_context())


@pytest.mark.parametrize("verify", [True, False])
def test_the_tls_block_follows_the_files(tmp_path: Path, verify: bool) -> None:
    from dataclasses import replace

    from kiln_contracts.natsauth.server import server_config, setup_trust

    tls = replace(make_ca(tmp_path / "ca").server_tls(), verify=verify)
    conf = server_config(setup_trust(tmp_path / "trust"), port=4222, store_dir=tmp_path / "js", tls=tls)
    assert f'cert_file: "{tls.cert_file}"' in conf and f'ca_file: "{tls.ca_file}"' in conf
    assert f"verify: {'true' if verify else 'false'}" in conf


async def test_new_certificates_take_effect_on_reload_without_a_restart(tmp_path: Path) -> None:
    """The certificate files are replaced (here by another CA's, the hardest case) and the server is told to reload
    (SIGHUP, what ``nats-server --signal reload`` sends): connections made before stay up, new ones get the new
    certificate, and clients trusting only the old CA are refused from then on."""
    import shutil
    import signal

    old, new = make_ca(tmp_path / "old"), make_ca(tmp_path / "new", "new-ca")
    live = tmp_path / "live"
    shutil.copytree(old.root, live)
    with auth_nats(tmp_path / "bus", ("gpu",), tls=PrivateCA(live).server_tls()) as server:
        prov = await client(server, "provisioner", tls=old.client_context())
        await provision(prov.js, ("gpu",))
        await prov.close()
        before = await client(server, "runner-gpu", tls=old.client_context())
        for name in ("ca.pem", "server.pem", "server-key.pem"):
            shutil.copy(new.root / name, live / name)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGHUP)
        after = None
        for _ in range(50):  # the reload takes a moment
            try:
                after = await client(server, "runner-gpu", tls=new.client_context(), allow_reconnect=False,
                                     max_reconnect_attempts=0, connect_timeout=1)
                break
            except Exception:  # noqa: BLE001 - still the old certificate
                await asyncio.sleep(0.1)
        assert after is not None, server.log()[-2000:]
        assert "Reloaded" in server.log() or "reloaded" in server.log()
        assert "CERTIFICATE_VERIFY_FAILED" in await _refused(server.url, server.creds("runner-gpu"), old.client_context())
        ack = await before.js.publish(subjects.event("p1", "j1", "status"), b"{}")  # the old connection stays up
        assert ack.stream == "KILN_EVENTS"
        await before.close()
        await after.close()
