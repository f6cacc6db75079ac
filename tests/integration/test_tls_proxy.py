"""The API and the notifier behind the example TLS proxy (deploy/proxy/nginx.conf, run by a real nginx with
certificates from a test CA): REST, the page's sign-in cookie and a ticketed live socket all over one HTTPS origin."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from kiln_local.stack import Stack, StackConfig, free_port
from kiln_testing import stop_process, wait_for_port
from kiln_testing.natsauth import PrivateCA, make_ca
from kiln_testing.notifier import authorized

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "proxy" / "nginx.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
pytestmark = pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed (scripts/install-system.sh "
                                                                  "installs it)")


def render(api_port: int, notifier_port: int, https_port: int, http_port: int, ca: PrivateCA) -> str:
    """The example config with this test's ports and files: nothing else changes."""
    text = EXAMPLE.read_text()
    swaps = {"127.0.0.1:8000": f"127.0.0.1:{api_port}", "127.0.0.1:8001": f"127.0.0.1:{notifier_port}",
             "listen 443 ssl": f"listen 127.0.0.1:{https_port} ssl", "listen 80;": f"listen 127.0.0.1:{http_port};",
             "/etc/kiln/tls/kiln.crt": str(ca.root / "server.pem"), "/etc/kiln/tls/kiln.key": str(ca.root / "server-key.pem"),
             "https://$host$request_uri": f"https://$host:{https_port}$request_uri"}
    for old, new in swaps.items():
        assert text.count(old) == 1, old  # the example still reads as this test expects
        text = text.replace(old, new)
    return text


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str, PrivateCA, int]]:
    root = tmp_path_factory.mktemp("proxy")
    ca = make_ca(root / "ca")
    https_port, http_port = free_port(), free_port()
    public = f"https://localhost:{https_port}"
    cfg = StackConfig(data_dir=root / "kiln", api_port=free_port(), notifier_port=free_port(), nats_port=free_port(),
                      public_url=public)
    prefix = root / "nginx"
    (prefix / "tmp").mkdir(parents=True)
    conf = prefix / "nginx.conf"
    conf.write_text(render(cfg.api_port, cfg.notifier_port, https_port, http_port, ca))
    checked = subprocess.run([NGINX, "-t", "-c", str(conf), "-p", str(prefix)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    with Stack(cfg) as stack:
        log = prefix / "nginx.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(prefix), "-g", "daemon off;"], stdout=out,
                                    stderr=subprocess.STDOUT)
        try:
            wait_for_port(https_port, proc, log)
            yield stack, public, ca, http_port
        finally:
            stop_process(proc)


def test_rest_and_the_page_sign_in_go_through_the_proxy(proxied: tuple[Stack, str, PrivateCA, int]) -> None:
    stack, public, ca, http_port = proxied
    with httpx.Client(base_url=public, verify=ca.client_context(None), timeout=10) as c:
        assert c.get("/").status_code == 200 and "<html" in c.get("/").text.lower()
        config = c.get("/api/v1/config").json()
        assert config["notifier_url"] == "wss://" + public.removeprefix("https://")
        assert c.get("/api/v1/me").status_code == 401
        me = c.get("/api/v1/me", headers={"Authorization": f"Bearer {stack.owner_key()}"})
        assert me.status_code == 200 and me.json()["is_owner"], me.text
        assert c.get("/").headers["strict-transport-security"].startswith("max-age=")
        assert [c.get(path).status_code for path in ("/metrics", "/livez", "/readyz", "/healthz")] == [404] * 4
        assert httpx.get(f"{stack.api_url}/healthz").status_code == 200  # on the API's own port they answer
        r = c.post("/api/v1/session", json={"api_key": stack.owner_key()})
        assert r.status_code == 200, r.text
        cookie = r.headers["set-cookie"].lower()
        assert "kiln_session=" in cookie and "secure" in cookie and "httponly" in cookie
    # Plain HTTP only redirects to HTTPS; it never reaches the API.
    r = httpx.get(f"http://localhost:{http_port}/api/v1/me", timeout=5)
    assert r.status_code == 308 and r.headers["location"].startswith(public)
    # A client that does not trust the proxy's CA is refused by its own TLS check.
    with pytest.raises(httpx.ConnectError):
        httpx.get(public + "/api/v1/config", timeout=5)


async def test_a_ticketed_live_socket_goes_through_the_proxy(proxied: tuple[Stack, str, PrivateCA, int]) -> None:
    stack, public, ca, _ = proxied
    auth = {"Authorization": f"Bearer {stack.owner_key()}"}
    async with httpx.AsyncClient(base_url=public, verify=ca.client_context(None), headers=auth, timeout=10) as c:
        job = (await c.post("/api/v1/jobs", json={"model": "yolov8n.yaml", "dataset": "/nowhere", "start": False}))
        assert job.status_code == 201, job.text
        ticket = (await c.post("/api/v1/ws-tickets", json={"jobs": [job.json()["id"]]})).json()["ticket"]
    tls = ssl.create_default_context(cafile=str(ca.root / "ca.pem"))
    url = "wss://" + public.removeprefix("https://") + f"/api/v1/ws/jobs/{job.json()['id']}"
    async with websockets.connect(url, ssl=tls, origin=public,
                                  subprotocols=["kiln.v1", f"kiln.ticket.{ticket}"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "kiln.v1"
        await authorized(ws)
    # The page's own socket (several jobs and projects on one connection) has no path after /ws.
    async with websockets.connect(url.rsplit("/jobs/", 1)[0], ssl=tls, origin=public,
                                  subprotocols=["kiln.v1", f"kiln.ticket.{ticket}"]) as ws:  # type: ignore[list-item]
        await authorized(ws)
    # The notifier only takes the page's origin, through the proxy too.
    with pytest.raises(websockets.InvalidStatus):
        async with websockets.connect(url, ssl=tls, origin="https://evil.example",
                                      subprotocols=["kiln.v1", f"kiln.ticket.{ticket}"]):  # type: ignore[list-item]
            pass
