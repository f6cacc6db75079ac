"""The web page's files as the API serves them, without a browser or services: every module the page imports is
served with a JavaScript type, nothing comes from another host (the page must work offline), and the vendored
chart library keeps its licence."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kiln_api.app import WEB_DIR, create_app
from kiln_api.settings import Settings

IMPORT = re.compile(r"""^\s*import\s[^"']*["'](\.{1,2}/[^"']+)["']""", re.M)


@pytest.fixture(scope="module")
def client() -> TestClient:
    # No `with`: the lifespan (database, NATS) does not run; static files and routing do not need it.
    return TestClient(create_app(Settings(database_url="sqlite+aiosqlite:///:memory:")))


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
    assert {"app.js", "js/live.js", "js/charts.js", "js/job.js", "js/jobs.js", "js/form.js"} <= set(found)
    for path in found:
        r = client.get(f"/{path}")
        assert r.status_code == 200, path
        assert "javascript" in r.headers["content-type"], (path, r.headers["content-type"])
        assert "http://" not in r.text and "https://" not in r.text, f"{path} reaches outside the API's host"


def test_api_routes_win_over_the_static_mount(client: TestClient) -> None:
    assert client.get("/openapi.json").json()["info"]["title"] == "Kiln API"
    assert "/api/v1/config" in client.get("/openapi.json").json()["paths"]


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
