"""The web page in a real browser: Debian's headless Chromium driven by Playwright, against the whole local stack
(bundled nats-server, API, notifier, metrics-writer, a runner training YOLO for real).

The page signs in with the owner's key (the stack writes it on first start); the test's own API calls use that key
as a bearer token. Sign-in, sign-out and what other users see: test_web_auth.py.

It starts a 2-epoch job from the form (after the server has rejected a bad image size next to the field), watches
the chart gain points and the status become completed, cuts the page's live connection in the middle (the job
finishes while it is cut) and checks that the page resumes from its cursors with nothing missing and nothing
twice, compares two jobs, and cancels a long job from its page.

Screenshots go to the test's temporary folder; with KILN_UPDATE_SCREENSHOTS=1 they also replace
docs/screenshots/job.png and jobs.png.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from kiln_local.stack import Stack, StackConfig, free_port
from kiln_local.synth import make_detection_dataset

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync"]
FORM = {"name": "web-e2e", "epochs": "2", "imgsz": "64", "batch": "8", "workers": "0", "seed": "0"}
ADVANCED = {"nbs": "8", "warmup_epochs": "0"}
LONG_TRAIN = {"epochs": 50, "imgsz": 64, "batch": 8, "nbs": 8, "workers": 0, "warmup_epochs": 0}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # the page drops terminal colour codes from log lines


def _need(what: str, why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI: {why}")
    pytest.skip(f"{what} missing: {why}")


@pytest.fixture(scope="module")
def sync_playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need("playwright", "pip install -r requirements-dev.txt")
    if not CHROMIUM.exists():
        _need(str(CHROMIUM), "apt-get install -y chromium (Playwright drives Debian's Chromium, "
                             "never `playwright install`)")
    return sync_playwright


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("web") / "kiln"
    cfg = StackConfig(data_dir=data_dir, api_port=free_port(), notifier_port=free_port(), nats_port=free_port())
    with Stack(cfg) as s:
        yield s


def make_dataset(stack: Stack) -> Path:
    """The tiny detection dataset, under the stack's datasets folder (runners read only under their data roots)."""
    return make_detection_dataset(stack.data_dir / "datasets" / "shapes", n_train=16, n_val=8, imgsz=64)


@pytest.fixture(scope="module")
def dataset(stack):
    return make_dataset(stack)


@pytest.fixture(scope="module")
def owner(stack) -> dict[str, str]:
    """Headers of the test's own API calls: the owner's key as a bearer token."""
    return bearer(stack.owner_key())


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def sign_in(page, api: str, key: str) -> None:
    """Open the page, sign in through its form, and wait until it is live."""
    page.goto(f"{api}/")
    page.fill("#api-key", key)
    page.click(".signin-form button[type=submit]")
    page.wait_for_selector("#conn[data-state='live']")
    # Before signing in, the page's session check answered 401 (Chromium logs it): that one is expected.
    page.errors[:] = [e for e in page.errors if "status of 401" not in e]


@pytest.fixture()
def browser_page(sync_playwright, stack):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        context = browser.new_context(viewport={"width": 1440, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(30_000)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        expected = ("WebSocket", "status of 422")  # the cut connections; the form's rejected first submit
        page.on("console", lambda m: m.type == "error" and not any(e in m.text for e in expected)
                and errors.append(m.text))
        page.errors = errors
        yield page
        browser.close()


class Gate:
    """Sits between the page and the notifier (Playwright's WebSocket routing).

    It can cut every live connection and refuse new ones for a while, like a notifier restart or a network drop,
    and it decides when the page hears what the notifier sent: with ``hold_after_first_epoch`` it passes messages
    up to the first epoch event and holds the rest, so the page is in a known state whatever the training's pace.
    """

    def __init__(self) -> None:
        self.open = True
        self.routes: list = []
        self.connections = 0
        self.hold_after_first_epoch = False
        self.holding = False  # messages from the notifier wait in ``held`` instead of reaching the page
        self.held: list = []

    def __call__(self, ws) -> None:
        if not self.open:
            ws.close(code=1013, reason="gate closed")
            return
        server = ws.connect_to_server()
        server.on_message(lambda message: self._from_server(ws, message))
        self.routes.append(ws)
        self.connections += 1

    def _from_server(self, ws, message) -> None:
        if self.holding:
            self.held.append((ws, message))
            return
        ws.send(message)
        if self.hold_after_first_epoch and '"kind":"epoch"' in message.replace(" ", ""):
            self.holding = True

    def release(self) -> None:
        """Hand everything held to the page at once, in order (as a congested link or a busy tab would)."""
        self.holding, self.hold_after_first_epoch = False, False
        held, self.held = self.held, []
        for ws, message in held:
            ws.send(message)

    def cut(self) -> None:
        """Close every connection; what was held is lost with it (the page's cursors stay before it)."""
        self.open = False
        for ws in self.routes:
            ws.close(code=1012, reason="cut by test")
        self.routes.clear()
        self.held.clear()
        self.holding, self.hold_after_first_epoch = False, False


def wait_api(api: str, job_id: str, want: set[str], headers: dict[str, str], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{api}/api/v1/jobs/{job_id}", headers=headers, timeout=10).json()
        if job["status"] in want:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never reached {want}: {job['status']}")


def shot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("KILN_UPDATE_SCREENSHOTS"):
        target = ROOT / "docs" / "screenshots" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def test_start_watch_resume_compare_and_cancel_in_a_browser(browser_page, stack, dataset, owner, tmp_path):
    page, api = browser_page, stack.api_url
    gate = Gate()
    gate.hold_after_first_epoch = True  # the page hears the first epoch, not (yet) the second: whatever the pace
    page.route_web_socket(re.compile(r"/api/v1/ws$"), gate)

    sign_in(page, api, stack.owner_key())
    page.click("nav.main >> text=New job")

    # The server's validation, shown next to the field it names.
    page.fill("[data-field='model'] input", "yolov8n.yaml")
    page.fill("[data-field='dataset'] input", str(dataset))
    page.fill("[data-field='train.imgsz'] input", "65")
    page.click("button[type=submit]")
    error = page.locator("[data-field='train.imgsz'] .field-error")
    error.wait_for()
    assert "multiple of 32" in error.inner_text()
    assert page.url.endswith("#/new")

    for name, value in FORM.items():
        page.fill(f"[data-field='{'name' if name == 'name' else 'train.' + name}'] input", value)
    page.click("details.section > summary")
    for name, value in ADVANCED.items():
        page.fill(f"[data-field='train.{name}'] input", value)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"#/jobs/[\w-]+$"))
    job_id = page.url.rsplit("/", 1)[1]
    head = page.locator(".job-head .chip")

    # Live: the loss chart gains its first point...
    page.wait_for_selector("[data-chart='loss'][data-points='1']", timeout=120_000)
    assert gate.holding
    assert page.locator("[data-chart='val']").count() == 1 and page.locator("[data-chart='lr']").count() == 1
    # ...then the connection is cut and the job finishes while the page cannot hear about it...
    gate.cut()
    page.wait_for_selector("#conn[data-state='reconnecting']")
    wait_api(api, job_id, {"completed"}, owner)
    assert page.locator("[data-chart='loss']").get_attribute("data-points") == "1"
    assert head.get_attribute("data-status") != "completed"
    # ...and once it can reconnect it resumes from its cursors: the second point and the end arrive.
    gate.open = True
    page.click("#conn")
    page.wait_for_selector("#conn[data-state='live']")
    page.wait_for_selector("[data-chart='loss'][data-points='2']")
    page.wait_for_selector(".job-head .chip[data-status='completed']")
    assert gate.connections >= 2
    assert page.evaluate("window.kiln.live.duplicates") == 0
    timeline = page.locator(".timeline li").evaluate_all("els => els.map(e => e.dataset.status)")
    assert timeline == ["queued", "starting", "running", "completed"]
    assert page.locator(".progress").get_attribute("data-epoch") == "2"

    # Every log line exactly once: the page shows what the API stored, in order, with no gap and no repeat.
    deadline = time.monotonic() + 15
    while True:
        rows = httpx.get(f"{api}/api/v1/jobs/{job_id}/logs", params={"tail": 10000}, headers=owner).json()
        stored = [ANSI.sub("", r["text"]) or " " for r in rows]
        shown = page.locator(".log-line").evaluate_all("els => els.map(e => e.textContent)")
        if stored == shown or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert shown and shown == stored
    page.wait_for_timeout(500)  # let the last frame paint before the picture
    shot(page, tmp_path, "job.png")

    # Cancel another job from its page: a long one, cancelled while it trains.
    r = httpx.post(f"{api}/api/v1/jobs", json={"name": "long run", "model": "yolov8n.yaml", "dataset": str(dataset),
                                               "train": LONG_TRAIN, "start": True}, headers=owner, timeout=10)
    assert r.status_code == 201, r.text
    long_id = r.json()["id"]
    page.goto(f"{api}/#/jobs/{long_id}")
    page.wait_for_selector(".job-head .chip[data-status='running']", timeout=120_000)
    page.click(".job-head button:has-text('Cancel')")
    page.click(".job-head button:has-text('Confirm cancel')")
    page.wait_for_selector(".job-head .chip[data-status='cancelled']", timeout=60_000)
    page.wait_for_selector(".failure:has-text('Cancelled')")
    panel = page.locator(".failure").inner_text()
    assert "exit code" not in panel, panel  # a cancel someone asked for is not a crash
    assert "\x1b" not in panel and "[K" not in panel, panel  # the trainer's last lines without terminal codes
    assert wait_api(api, long_id, {"cancelled"}, owner, timeout=30)["status"] == "cancelled"

    # Compare overlays the same metric of both jobs.
    page.goto(f"{api}/#/compare?ids={job_id},{long_id}&metric=train/box_loss")
    page.wait_for_selector("[data-chart='compare'][data-series='2']")
    assert page.locator("#compare-metric").input_value() == "train/box_loss"

    # The list: both jobs with their colours; the filter narrows it.
    page.goto(f"{api}/#/jobs")
    page.wait_for_selector(f"tr[data-job-id='{job_id}'][data-status='completed']")
    page.wait_for_selector(f"tr[data-job-id='{long_id}'][data-status='cancelled']")
    assert "2/2" in page.locator(f"tr[data-job-id='{job_id}'] .progress-cell").inner_text()
    shot(page, tmp_path, "jobs.png")
    page.click("a.filter[data-filter='cancelled']")
    page.wait_for_function("document.querySelectorAll('tbody tr').length === 1")
    assert page.locator("tbody tr").get_attribute("data-job-id") == long_id

    assert page.errors == []


SHORT_TRAIN = {"epochs": 2, "imgsz": 64, "batch": 8, "nbs": 8, "workers": 0, "warmup_epochs": 0, "seed": 0}
LOSS_POINTS = """() => { const el = document.querySelector("[data-chart='loss']"); return el && el.dataset.points; }"""


def short_job(api: str, dataset: Path, name: str, headers: dict[str, str], project: str = "default") -> str:
    """Create and start a 2-epoch job through the REST API."""
    r = httpx.post(f"{api}/api/v1/jobs", json={"name": name, "model": "yolov8n.yaml", "dataset": str(dataset),
                                               "project": project, "train": SHORT_TRAIN, "start": True},
                   headers=headers, timeout=10)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _watch_loss_points(page) -> None:
    """Record every value the loss chart's point count takes (a MutationObserver misses no change)."""
    page.evaluate("""() => { window.lossPoints = [];
      new MutationObserver((ms) => ms.forEach((m) => m.target.dataset.chart === "loss" &&
        window.lossPoints.push(m.target.dataset.points)))
      .observe(document.body, {subtree: true, attributes: true, attributeFilter: ["data-points"]}); }""")


def _every_epoch_once(page, api: str, job_id: str, headers: dict[str, str]) -> None:
    stored = httpx.get(f"{api}/api/v1/jobs/{job_id}/epochs", headers=headers, timeout=10).json()
    assert [row["epoch"] for row in stored] == [1, 2]
    page.wait_for_selector(".job-head .chip[data-status='completed']")
    page.wait_for_function(f"({LOSS_POINTS})() === '2'")
    page.wait_for_timeout(300)  # a late duplicate or a third point would land within a few frames
    assert page.evaluate(LOSS_POINTS) == "2"
    assert all(p in ("1", "2") for p in page.evaluate("window.lossPoints")), page.evaluate("window.lossPoints")
    assert page.locator(".progress").get_attribute("data-epoch") == "2"
    timeline = page.locator(".timeline li").evaluate_all("els => els.map(e => e.dataset.status)")
    assert timeline == ["queued", "starting", "running", "completed"]
    assert page.evaluate("window.kiln.live.duplicates") == 0


def test_a_short_job_shows_every_epoch_once_whatever_arrives_first(browser_page, stack, dataset, owner):
    """A job that ends before the page hears of it: the socket's messages held until it completed and then
    delivered in one burst (both epochs reach the page in the same frame), and the page's REST reads held
    until it completed while the socket runs live. Either way every epoch is on the chart exactly once."""
    page, api = browser_page, stack.api_url
    gate = Gate()
    page.route_web_socket(re.compile(r"/api/v1/ws$"), gate)
    sign_in(page, api, stack.owner_key())

    # 1. The notifier's messages reach the page only after the job has completed, all at once.
    gate.holding = True
    job_id = short_job(api, dataset, "burst", owner)
    page.goto(f"{api}/#/jobs/{job_id}")
    page.wait_for_selector(".job-head .chip")  # the REST snapshot is in: queued, no epochs yet
    _watch_loss_points(page)
    wait_api(api, job_id, {"completed"}, owner)
    page.wait_for_timeout(1000)  # the writer's epoch rows and the last events are on their way
    assert page.evaluate(LOSS_POINTS) is None and gate.held
    gate.release()
    _every_epoch_once(page, api, job_id, owner)

    # 2. The page's REST reads wait until the job has completed; the socket delivers everything first.
    held: list = []
    reads = re.compile(r"/api/v1/jobs/[\w-]+(/metrics|/logs)?(\?.*)?$")
    page.route(reads, lambda route: held.append(route))
    job_id = short_job(api, dataset, "rest-late", owner)
    page.goto(f"{api}/#/jobs/{job_id}")
    _watch_loss_points(page)
    wait_api(api, job_id, {"completed"}, owner)
    page.wait_for_function("window.kiln.live.subs.size > 0")
    page.wait_for_timeout(1000)
    # The job's four reads (detail, epoch and step metrics, log tail) wait; nothing is drawn before them.
    assert len([r for r in held if f"/jobs/{job_id}" in r.request.url]) == 4, [r.request.url for r in held]
    assert page.evaluate(LOSS_POINTS) is None
    for route in held:
        route.continue_()
    page.unroute(reads)
    _every_epoch_once(page, api, job_id, owner)
    assert page.errors == []
