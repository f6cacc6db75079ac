"""The web page's files as the API serves them, without a browser or services: every module the page imports is
served with a JavaScript type, nothing comes from another host (the page must work offline), the vendored
chart library keeps its licence, and what the page needs before sign-in is public while the rest is not."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kiln_api.app import WEB_DIR, create_app
from kiln_testing.api import api_settings

IMPORT = re.compile(r"""^\s*import\s[^"']*["'](\.{1,2}/[^"']+)["']""", re.M)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    # No `with`: the lifespan (database, NATS) does not run; static files and routing do not need it.
    return TestClient(create_app(api_settings(tmp_path_factory.mktemp("api"))))


def modules() -> list[str]:
    """Every ES module reachable from app.js, as URL paths."""
    seen: list[str] = []
    todo = ["app.js"]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.append(path)
        base = Path(path).parent
        for rel in IMPORT.findall((WEB_DIR / path).read_text()):
            todo.append(str((base / rel)).replace("\\", "/").removeprefix("./"))
    return seen


def test_index_is_served_at_the_root_and_loads_only_local_files(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    refs = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert "app.js" in refs and "vendor/uplot/uPlot.iife.min.js" in refs
    external = [u for u in refs if re.match(r"^(https?:)?//", u)]
    assert external == [], f"the page must work offline, but loads {external}"
    for ref in refs:
        if not ref.startswith(("data:", "#")):
            assert client.get(f"/{ref}").status_code == 200, ref


def test_every_module_is_served_as_javascript(client: TestClient) -> None:
    found = modules()
    assert {"app.js", "js/live.js", "js/charts.js", "js/job.js", "js/jobs.js", "js/form.js", "js/signin.js",
            "js/tickets.js", "js/access.js"} <= set(found)
    for path in found:
        r = client.get(f"/{path}")
        assert r.status_code == 200, path
        assert "javascript" in r.headers["content-type"], (path, r.headers["content-type"])
        assert "http://" not in r.text and "https://" not in r.text, f"{path} reaches outside the API's host"


def test_api_routes_win_over_the_static_mount(client: TestClient) -> None:
    assert client.get("/openapi.json").json()["info"]["title"] == "Kiln API"
    assert "/api/v1/config" in client.get("/openapi.json").json()["paths"]


def test_the_page_loads_and_signs_in_without_credentials_and_needs_them_for_the_rest(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    need = {(m.upper(), p): op["x-kiln-access"]["need"] for p, ops in paths.items() if p.startswith("/api/v1/")
            for m, op in ops.items()}
    assert need[("GET", "/api/v1/config")] == "public" and need[("POST", "/api/v1/session")] == "public"
    # What the page reads to decide which buttons and projects to offer (js/access.js).
    assert {need[("POST", "/api/v1/jobs")], need[("POST", "/api/v1/jobs/{job_id}/cancel")],
            need[("POST", "/api/v1/jobs/{job_id}/start")], need[("POST", "/api/v1/jobs/{job_id}/rerun")]} == {"member"}
    assert need[("POST", "/api/v1/ws-tickets")] == "user" and need[("GET", "/api/v1/session")] == "user"
    for path in ("/", "/app.js", "/js/api.js", "/openapi.json"):
        assert client.get(path).status_code == 200, path


def test_the_page_keeps_no_key_or_ticket_in_storage_or_urls() -> None:
    """The key goes only into the sign-in request's body; tickets only into the WebSocket's subprotocol."""
    sources = {path: (WEB_DIR / path).read_text() for path in modules()}
    for path, text in sources.items():
        for word in ("localStorage", "sessionStorage", "document.cookie", "indexedDB"):
            assert word not in text, f"{path} uses {word}"
        assert "?ticket" not in text and "ticket=" not in text, path
    assert 'type: "password"' in sources["js/signin.js"] and 'autocomplete: "off"' in sources["js/signin.js"]
    # One place adds the CSRF header: the API module's request().
    assert [p for p, t in sources.items() if "X-CSRF-Token" in t] == ["js/api.js"]


def test_vendored_uplot_keeps_its_mit_licence() -> None:
    vendor = WEB_DIR / "vendor" / "uplot"
    assert "MIT License" in (vendor / "LICENSE").read_text()
    assert (vendor / "uPlot.iife.min.js").stat().st_size > 10_000
    assert (vendor / "uPlot.min.css").exists()


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed (syntax check only)")
def test_modules_parse(tmp_path: Path) -> None:
    for path in modules():
        copy = tmp_path / (path.replace("/", "_") + ".mjs")  # .mjs: node parses it as an ES module
        copy.write_text((WEB_DIR / path).read_text())
        done = subprocess.run(["node", "--check", str(copy)], capture_output=True, text=True)
        assert done.returncode == 0, f"{path}: {done.stderr}"


TICKETS_CHECK = """
import {scopeOf, offer, issuedAt, renewAfterMs} from "./tickets.mjs";
const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
const jwt = `${b64({alg: "EdDSA"})}.${b64({sub: "u", iat: 1000, exp: 1060})}.sig`;
const out = {
  scope: scopeOf(["job:j-1", "project:vision", "job:j-2"]),
  short: offer("abc"),
  long: offer("x".repeat(5000)).protocols,  // too long for a header line: sent as the first frame instead
  first: offer("x".repeat(5000)).first.op,
  iat: issuedAt(jwt), garbage: issuedAt("not-a-jwt"),
  api: renewAfterMs(jwt, 300),                 // the API's renew_within_s alone: 80 % of 300 s
  notifier: renewAfterMs(jwt, 300, 1010),      // the notifier allows 10 s after issue: renew after 8 s
  skewed: renewAfterMs(jwt, 300, 999),         // a deadline before the issue time says nothing: the API's
  floor: renewAfterMs(jwt, 1),
};
console.log(JSON.stringify(out));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_ticket_scope_and_renewal_time(tmp_path: Path) -> None:
    (tmp_path / "tickets.mjs").write_text((WEB_DIR / "js" / "tickets.js").read_text())
    (tmp_path / "check.mjs").write_text(TICKETS_CHECK)
    done = subprocess.run(["node", str(tmp_path / "check.mjs")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "scope": {"jobs": ["j-1", "j-2"], "projects": ["vision"]}, "short": {"protocols": ["kiln.v1", "kiln.ticket.abc"], "first": None},
        "long": ["kiln.v1"], "first": "auth",
        "iat": 1000, "garbage": None, "api": 240_000, "notifier": 8000, "skewed": 240_000, "floor": 1000}
