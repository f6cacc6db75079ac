"""Signing in to the web page, in a real browser against the whole local stack (see test_web.py).

The owner signs in with their key (after a key that is not one and a revoked one were refused with the reason),
starts a 2-epoch job from the form and watches its epochs arrive over the notifier's WebSocket, which the page opens
with a ticket in its subprotocol and renews in time; a renewal that cannot be had ends the socket (4401) and the page
comes back with a new ticket and its cursors. Signing out leaves nothing on the page, and the old cookie is refused.
Users of another project see nothing of the owner's job; a viewer is told they cannot create jobs. A user known to
the identity provider (a small one the test serves on loopback) signs in through it; an unknown one is told why.

The notifier here wants a fresh ticket every 10 s (KILN_NOTIFIER_RECHECK_S), so renewals happen within the test.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
from test_web import CHROMIUM, LAUNCH_ARGS, SHORT_TRAIN, bearer, make_dataset, short_job, sync_playwright  # noqa: F401

from kiln_local.stack import Stack, StackConfig, free_port
from kiln_testing.api import make_user
from kiln_testing.oidc import IdentityProvider

pytestmark = pytest.mark.e2e
RECHECK_S = 10
TICKETS = re.compile(r"/api/v1/ws-tickets$")
CLIENT_ID = "kiln-page"


@pytest.fixture(scope="module")
def idp():
    provider = IdentityProvider()
    yield provider
    provider.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, idp):
    data_dir = tmp_path_factory.mktemp("web-auth") / "kiln"
    cfg = StackConfig(data_dir=data_dir, api_port=free_port(), notifier_port=free_port(), nats_port=free_port(),
                      extra_env={"KILN_NOTIFIER_RECHECK_S": str(RECHECK_S), "KILN_API_OIDC_ISSUER": idp.issuer,
                                 "KILN_API_OIDC_CLIENT_ID": CLIENT_ID})
    with Stack(cfg) as s:
        yield s


@pytest.fixture(scope="module")
def owner(stack):
    """The test's own REST client, with the owner's key."""
    with httpx.Client(base_url=stack.api_url, headers=bearer(stack.owner_key()), timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def browser(sync_playwright):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield browser
        browser.close()


def open_page(browser, expected: tuple[str, ...]):
    """A page in a fresh context (its own cookies); console errors other than `expected` ones are collected."""
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.on("console", lambda m: m.type == "error" and not any(e in m.text for e in expected)
            and page.errors.append(m.text))
    return page


def watch_sockets(page) -> dict[str, list[str]]:
    """Every WebSocket URL the page opens and every frame it sends and receives."""
    seen: dict[str, list[str]] = {"urls": [], "sent": [], "received": []}

    def on_socket(ws) -> None:
        seen["urls"].append(ws.url)
        ws.on("framesent", lambda payload: seen["sent"].append(str(payload)))
        ws.on("framereceived", lambda payload: seen["received"].append(str(payload)))

    page.on("websocket", on_socket)
    return seen


def sign_in(page, key: str) -> None:
    page.wait_for_selector("#api-key")
    page.fill("#api-key", key)
    page.click(".signin-form button[type=submit]")


def refused(page, key: str) -> str:
    sign_in(page, key)
    error = page.locator(".signin-form .form-error")
    error.wait_for()
    return error.inner_text()


def live(page, attr: str):
    return page.evaluate(f"window.kiln.live.{attr}")


def test_sign_in_watch_live_renew_and_sign_out(browser, stack, owner):
    api, key = stack.api_url, stack.owner_key()
    dataset = make_dataset(stack)
    page = open_page(browser, expected=("status of 401", "net::ERR_FAILED"))
    sockets = watch_sockets(page)
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(f"{api}/")
    page.wait_for_selector("#api-key")
    field = page.locator("#api-key")
    assert field.get_attribute("type") == "password" and field.get_attribute("autocomplete") == "off"
    assert page.locator("nav.main").is_hidden() and page.locator("#who").is_hidden()

    # Refused keys, with the reason in words.
    assert refused(page, "hello").startswith("That key was not accepted: not a Kiln API key")
    spare = owner.post("/api/v1/users/me/keys", json={"name": "spare"}).json()
    assert owner.delete(f"/api/v1/users/me/keys/{spare['id']}").status_code == 204
    assert refused(page, spare["key"]) == f"That key was not accepted: API key {spare['id']} was revoked"
    assert page.locator("nav.main").is_hidden()

    # The owner signs in: who it is in the header; the key is kept nowhere; the cookie is out of script's reach.
    sign_in(page, key)
    page.wait_for_selector("#conn[data-state='live']")
    me = owner.get("/api/v1/me").json()
    assert page.locator("#who-name").inner_text() == me["name"]
    assert page.locator("#who-role").inner_text() == "owner"
    assert page.evaluate("[localStorage.length, sessionStorage.length, document.cookie]") == [0, 0, ""]
    assert key not in page.url and key not in page.content()
    [cookie] = [c for c in page.context.cookies() if c["name"] == "kiln_session"]
    assert (cookie["httpOnly"], cookie["secure"], cookie["sameSite"]) == (True, True, "Strict")

    # The cookie alone does not change anything: a POST needs the session's CSRF token beside it.
    spec = {"model": "yolov8n.yaml", "dataset": str(dataset), "train": SHORT_TRAIN, "start": False}
    r = page.request.post(f"{api}/api/v1/jobs", data=spec)
    assert r.status == 403 and "X-CSRF-Token" in r.json()["detail"], r.text()
    csrf = page.request.get(f"{api}/api/v1/session").json()["csrf_token"]
    r = page.request.post(f"{api}/api/v1/ws-tickets", data={"projects": ["default"]}, headers={"X-CSRF-Token": csrf})
    assert r.status == 200, r.text()

    # A job from the form (the page's POST carries the token), watched live.
    page.click("nav.main >> text=New job")
    page.wait_for_selector("[data-field='project'] select option", state="attached")  # drawn once the roles are read
    assert page.locator("[data-field='project'] select option").all_inner_texts() == ["default"]
    page.fill("[data-field='name'] input", "auth-e2e")
    page.fill("[data-field='model'] input", "yolov8n.yaml")
    page.fill("[data-field='dataset'] input", str(dataset))
    for name, value in {"epochs": "2", "imgsz": "64", "batch": "8", "workers": "0", "seed": "0"}.items():
        page.fill(f"[data-field='train.{name}'] input", value)
    page.click("details.section > summary")
    page.fill("[data-field='train.nbs'] input", "8")
    page.fill("[data-field='train.warmup_epochs'] input", "0")
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"#/jobs/[\w-]+$"))
    job_id = page.url.rsplit("/", 1)[1]
    page.wait_for_selector("[data-chart='loss'][data-points='2']", timeout=120_000)
    page.wait_for_selector(".job-head .chip[data-status='completed']", timeout=60_000)
    epochs = [json.loads(f) for f in sockets["received"] if '"kind":"epoch"' in f.replace(" ", "")]
    assert sorted(m["event"]["data"]["epoch"] for m in epochs if m["job_id"] == job_id) == [1, 2]
    assert all("ticket" not in url for url in sockets["urls"]), sockets["urls"]
    assert not any('"auth"' in f for f in sockets["sent"])  # the ticket rode in the subprotocol
    assert live(page, "ws.protocol") == "kiln.v1"

    # Renewed before the notifier's deadline: the same socket all along.
    page.wait_for_function("window.kiln.live.renewals >= 1", timeout=(RECHECK_S + 10) * 1000)
    assert '"op":"renew"' in "".join(sockets["sent"]).replace(" ", "")
    assert (live(page, "unauthorized"), live(page, "connects")) == (0, 1)

    # No ticket to be had (the API unreachable for a while): the notifier ends the socket with 4401, and the page
    # comes back with a new ticket, after its cursors: nothing twice.
    page.route(TICKETS, lambda route: route.abort())
    page.wait_for_function("window.kiln.live.unauthorized >= 1", timeout=(RECHECK_S + 10) * 1000)
    page.unroute(TICKETS)
    page.wait_for_function("window.kiln.live.state === 'live' && window.kiln.live.connects >= 2", timeout=30_000)
    resumed = [json.loads(f) for f in sockets["sent"] if '"subscribe"' in f and job_id in f]
    assert resumed[-1].get("after_events") and resumed[-1].get("after_logs"), resumed[-1]
    assert live(page, "duplicates") == 0
    assert page.locator("[data-chart='loss']").get_attribute("data-points") == "2"

    # Signing out: the sign-in screen and nothing else; the old cookie is refused from now on.
    page.click("#sign-out")
    page.wait_for_selector("#api-key")
    assert page.locator(".signin .notice").inner_text() == "You signed out."
    assert page.locator("nav.main").is_hidden() and page.locator("#who").is_hidden()
    assert job_id not in page.locator("#view").inner_html() and page.locator(".job-page").count() == 0
    assert page.evaluate("window.kiln.live === undefined")
    assert [c for c in page.context.cookies() if c["name"] == "kiln_session"] == []
    assert httpx.get(f"{api}/api/v1/jobs", cookies={"kiln_session": cookie["value"]}).status_code == 401
    assert page.evaluate("fetch('/api/v1/jobs').then((r) => r.status)") == 401
    opened, asked = len(sockets["urls"]), len(requests)
    page.wait_for_timeout(RECHECK_S * 1000)  # signed out: no socket, no renewal, no request
    assert (len(sockets["urls"]), requests[asked:]) == (opened, [])
    assert page.errors == []
    page.context.close()


def test_users_of_another_project_see_nothing_of_its_jobs(browser, stack, owner):
    api = stack.api_url
    spec = {"model": "yolov8n.yaml", "dataset": "shapes", "train": SHORT_TRAIN, "start": False}
    theirs = owner.post("/api/v1/jobs", json={**spec, "name": "not yours"}).json()["id"]
    _, member_key = make_user(owner, "vera", project="vision", role="member")
    viewer, viewer_key = make_user(owner, "walt", project="vision", role="viewer")
    ours = owner.post("/api/v1/jobs", json={**spec, "name": "vision job", "project": "vision"}).json()["id"]
    # The API's own answer: no ticket for another project's job.
    assert httpx.post(f"{api}/api/v1/ws-tickets", json={"jobs": [theirs]}, headers=bearer(member_key)).status_code == 404

    page = open_page(browser, expected=("status of 401", "status of 404"))
    page.goto(f"{api}/")
    sign_in(page, member_key)
    page.wait_for_selector("#conn[data-state='live']")
    assert page.locator("#who-name").inner_text() == "vera"
    page.wait_for_selector(f"tr[data-job-id='{ours}']")
    assert page.locator(f"tr[data-job-id='{theirs}']").count() == 0
    assert page.locator(f"tr[data-job-id='{ours}'] button:has-text('Cancel')").count() == 1

    page.goto(f"{api}/#/jobs/{theirs}")
    page.wait_for_selector(".error-page")
    assert "not found" in page.locator(".error-page").inner_text().lower()
    page.goto(f"{api}/#/jobs/{ours}")
    page.wait_for_selector(".job-head")
    assert page.locator("#who-role").inner_text() == "member in vision"
    assert page.locator(".job-head .view-only").count() == 0
    page.goto(f"{api}/#/new")
    page.wait_for_selector("[data-field='project'] select")
    assert page.locator("[data-field='project'] select option").all_inner_texts() == ["vision"]
    page.click("#sign-out")
    page.wait_for_selector("#api-key")

    # A viewer: the jobs, but no buttons that would be refused and no form that would fail.
    sign_in(page, viewer_key)
    page.wait_for_selector("#conn[data-state='live']")
    page.goto(f"{api}/#/jobs")
    page.wait_for_selector(f"tr[data-job-id='{ours}']")
    assert page.locator(f"tr[data-job-id='{ours}'] button").count() == 0
    page.goto(f"{api}/#/jobs/{ours}")
    page.wait_for_selector(".job-head .view-only")
    assert page.locator(".job-head button:has-text('Start')").count() == 0
    assert page.locator(".job-head button:has-text('Re-run')").count() == 0
    assert page.locator("#who-role").inner_text() == "viewer in vision"
    page.goto(f"{api}/#/new")
    page.wait_for_selector(".cannot")
    assert "You cannot create jobs" in page.locator(".cannot").inner_text()
    assert "viewer in vision" in page.locator(".cannot").inner_text()
    assert page.locator("form.job-form").count() == 0

    # The key the session stands on is revoked: the page's next call is refused, and it asks to sign in again.
    [key] = owner.get(f"/api/v1/users/{viewer}/keys").json()
    assert owner.delete(f"/api/v1/users/{viewer}/keys/{key['id']}").status_code == 204
    page.goto(f"{api}/#/jobs")
    page.wait_for_selector("#api-key")
    assert page.locator(".signin .notice").inner_text() == (
        "Your session ended: the API key this session signed in with is no longer valid: sign in again")
    assert page.locator("nav.main").is_hidden() and page.locator(f"tr[data-job-id='{ours}']").count() == 0
    assert page.errors == []
    page.context.close()


def test_sign_in_through_the_identity_provider(browser, stack, owner, idp):
    api = stack.api_url
    assert owner.post("/api/v1/users", json={"name": "ada", "oidc_subject": "ada@example"}).status_code == 201
    page = open_page(browser, expected=("status of 401",))
    page.goto(f"{api}/")
    start = page.locator(".signin a.oidc-start")
    assert start.get_attribute("href") == "/api/v1/session/oidc"
    assert idp.issuer in page.locator(".signin .oidc").inner_text()

    start.click()  # to the provider and back, signed in
    page.wait_for_selector("#conn[data-state='live']")
    assert page.locator("#who-name").inner_text() == "ada"
    assert page.evaluate("fetch('/api/v1/me').then((r) => r.json()).then((me) => me.name)") == "ada"
    page.click("nav.main >> text=New job")
    page.wait_for_selector(".cannot:has-text('not a member of any project')")
    page.click("#sign-out")
    page.wait_for_selector("#api-key")

    # Someone the provider knows but Kiln does not: back on the sign-in screen, told why, with a clean address.
    idp.subject = "mallory@example"
    page.click(".signin a.oidc-start")
    error = page.locator(".signin-form .form-error")
    error.wait_for()
    assert error.inner_text().startswith("Signing in with OIDC failed: you signed in, but no active Kiln user")
    assert "signin_error" not in page.url
    assert page.locator("nav.main").is_hidden()
    assert page.errors == []
    page.context.close()


def test_a_ticket_too_long_for_a_header_goes_in_the_first_frame(browser, stack, owner):
    """The owner's list follows every project: with many, the ticket no longer fits a handshake header line."""
    api = stack.api_url
    projects = [f"many-{i:02d}-{'x' * 50}" for i in range(80)]
    for p in projects:
        assert owner.post("/api/v1/projects", json={"id": p}).status_code == 201
    page = open_page(browser, expected=("status of 401",))
    sockets = watch_sockets(page)
    page.goto(f"{api}/")
    sign_in(page, stack.owner_key())
    page.wait_for_selector("#conn[data-state='live']")
    first = json.loads(sockets["sent"][0])
    assert first["op"] == "auth" and len(first["ticket"]) > 4096
    assert live(page, "ws.protocol") == "kiln.v1"
    # Heard over that socket: a job started in the last project appears in the list.
    job = owner.post("/api/v1/jobs", json={"name": "far away", "model": "yolov8n.yaml", "dataset": "nowhere",
                                           "project": projects[-1], "start": True}).json()["id"]
    page.wait_for_selector(f"tr[data-job-id='{job}']")
    assert page.errors == []
    page.context.close()
