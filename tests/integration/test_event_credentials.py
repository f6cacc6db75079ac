"""Third-party event credentials end to end: a project admin issues them through the API, a reader uses them against
a real nats-server with JWT auth (the generated configuration), and the server, not Kiln, enforces what they allow.

The API runs with its own creds and the trust directory (KILN_API_NATS_CREDS_FILE, KILN_API_NATS_TRUST_DIR).  The
reader's NATS connections run on a loop of their own (:class:`Loop`), so that the server closing them is seen when it
happens, not when a blocking API call returns.
"""

from __future__ import annotations

import asyncio
import doctest
import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import nats
import pytest
from nats.aio.client import RawCredentials
from nats.js import api as jsa
from nats.js.errors import NotFoundError

from kiln_contracts import streams, subjects
from kiln_contracts.natsauth import permissions as perms
from kiln_contracts.natsauth.provision import provision
from kiln_testing.api import api_client, bearer, make_user
from kiln_testing.natsauth import Client, auth_nats, client

ROOT = Path(__file__).resolve().parents[2]
EVENTS, LOGS = perms.EVENTS, perms.LOGS
SPEC = {"model": "yolov8n.yaml", "dataset": "/data/shapes", "start": True}
T = TypeVar("T")


class Loop:
    """An event loop on a thread of its own for the readers' NATS connections."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        async def cancel_the_rest() -> None:  # a failed test may leave a connection behind
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_the_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class Captured(logging.Handler):
    """Every log record of the process (the API's, FastAPI's, nats-py's), formatted with its arguments."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record) + (self.formatException(record.exc_info) if record.exc_info else ""))
        except Exception:  # noqa: BLE001 - a record that cannot format still must not hide a secret elsewhere
            self.lines.append(repr(record.__dict__))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """An auth nats-server (provisioned), the API with its NATS identity and the trust directory, projects A and B
    with an admin, a member and a viewer each, and a started job in each (so both have events)."""
    tmp = tmp_path_factory.mktemp("event-creds")
    log = Captured()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(log)
    root.setLevel(logging.DEBUG)
    loop = Loop()
    try:
        with auth_nats(tmp / "nats") as server:
            async def prepare() -> None:
                prov = await client(server, "provisioner")
                await provision(prov.js)
                await prov.close()

            loop.run(prepare())
            with api_client(tmp, nats_url=server.url, nats_creds_file=server.creds("api"),
                            nats_trust_dir=server.chain.root, create_rate_limit="1000/minute") as owner:
                users = {(p, r): make_user(owner, f"{p.lower()}-{r}", p, r)
                         for p in "AB" for r in ("viewer", "member", "admin")}
                jobs = {p: [owner.post("/api/v1/jobs", json=SPEC | {"project": p}).json()["id"]] for p in "AB"}
                yield {"server": server, "owner": owner, "users": users, "jobs": jobs, "loop": loop, "log": log,
                       "tmp": tmp, "issued": []}
    finally:
        loop.stop()
        root.removeHandler(log)
        root.setLevel(old_level)


def admin(world: dict[str, Any], project: str = "A") -> dict[str, str]:
    return bearer(world["users"][(project, "admin")][1])


def issue(world: dict[str, Any], name: str, project: str = "A", days: int = 7) -> dict[str, Any]:
    r = world["owner"].post(f"/api/v1/projects/{project}/event-credentials",
                            json={"name": name, "expires_in_days": days}, headers=admin(world, project))
    assert r.status_code == 201, r.text
    world["issued"].append(r.json())
    return r.json()


def start_job(world: dict[str, Any], project: str) -> str:
    r = world["owner"].post("/api/v1/jobs", json=SPEC | {"project": project})
    assert r.status_code == 201, r.text
    world["jobs"][project].append(r.json()["id"])
    return r.json()["id"]


async def reader(answer: dict[str, Any], label: str = "reader", **options: Any) -> Client:
    return await Client(label).connect(answer["nats_urls"][0], answer["creds"], answer["inbox_prefix"], **options)


async def drain(c: Client, answer: dict[str, Any], stream: str = EVENTS) -> list[str]:
    """Bind the answer's durable on ``stream`` (never creating one) and fetch and ack what is there."""
    spec = next(x for x in answer["consumers"] if x["stream"] == stream)
    sub = await c.js.pull_subscribe(spec["filter_subject"], durable=spec["durable"], stream=stream)
    got: list[str] = []
    while True:
        try:
            msgs = await sub.fetch(100, timeout=1)
        except asyncio.TimeoutError:  # nats-py raises its subclass or, from a lingering pull, this one
            return got
        for m in msgs:
            await m.ack()
        got += [m.subject for m in msgs]


async def refused_connect(url: str, creds: str) -> str:
    try:
        nc = await nats.connect(url, user_credentials=RawCredentials(creds), allow_reconnect=False,
                                max_reconnect_attempts=0, connect_timeout=2)
    except Exception as exc:  # noqa: BLE001 - the server's refusal, however nats-py wraps it
        return repr(exc)
    await nc.close()
    raise AssertionError("the server accepted the connection")


# -- issuing ------------------------------------------------------------------------------------------------------

def test_the_answer_carries_everything_a_reader_needs_once(world: dict[str, Any]) -> None:
    before = datetime.now(timezone.utc)
    got = issue(world, "acme", days=7)
    assert got["creds"].startswith("-----BEGIN NATS USER JWT-----") and "-----BEGIN USER NKEY SEED-----" in got["creds"]
    assert got["inbox_prefix"] == f"_INBOX.{got['public_key']}" and got["public_key"].startswith("U")
    assert got["nats_urls"] == [world["server"].url]
    assert got["consumers"] == [
        {"stream": EVENTS, "durable": "tp-A-acme", "filter_subject": "kiln.evt.A.>"},
        {"stream": LOGS, "durable": "tp-A-acme", "filter_subject": "kiln.log.A.*"}]
    expires = datetime.fromisoformat(got["expires_at"])
    assert timedelta(days=7) - timedelta(minutes=1) < expires - before < timedelta(days=7, minutes=1)
    assert got["status"] == "active" and got["revoked_at"] is None
    assert got["created_by"] == world["users"][("A", "admin")][0] and got["created_by_name"] == "a-admin"
    assert got["id"].startswith("evc_")


def test_the_reader_gets_only_its_projects_events_old_and_new(world: dict[str, Any]) -> None:
    answer = issue(world, "reader")

    async def first() -> tuple[list[str], list[str]]:
        c = await reader(answer)
        got = await drain(c, answer)
        logs = await drain(c, answer, LOGS)
        assert c.violations() == []
        await c.close()
        return got, logs

    got, logs = world["loop"].run(first())
    assert {s.split(".")[3] for s in got} >= set(world["jobs"]["A"][:1]), got  # history: the job started before
    assert got and all(s.startswith("kiln.evt.A.") for s in got), got
    assert logs == []
    new_b, new_a = start_job(world, "B"), start_job(world, "A")  # another project's events are published too

    async def later() -> list[str]:
        c = await reader(answer)
        got = await drain(c, answer)
        await c.close()
        return got

    again = world["loop"].run(later())
    assert subjects.event("A", new_a, "status") in again, again
    assert not any(".B." in s or new_b in s for s in again), again


def test_one_active_credential_per_name_and_names_are_one_token(world: dict[str, Any]) -> None:
    issue(world, "dup")
    owner = world["owner"]
    r = owner.post("/api/v1/projects/A/event-credentials", json={"name": "dup"}, headers=admin(world))
    assert r.status_code == 409 and "revoke them first" in r.json()["detail"]
    for bad in ("Acme", "a-b", "a.b", "", "x" * 33, "a b"):
        r = owner.post("/api/v1/projects/A/event-credentials", json={"name": bad}, headers=admin(world))
        assert r.status_code == 422, (bad, r.text)
    for days in (0, 366):
        r = owner.post("/api/v1/projects/A/event-credentials", json={"name": "ok", "expires_in_days": days},
                       headers=admin(world))
        assert r.status_code == 422, (days, r.text)
    assert owner.post("/api/v1/projects/B/event-credentials", json={"name": "dup"},
                      headers=admin(world, "B")).status_code == 201  # the same name in another project is another


# -- what the server refuses ----------------------------------------------------------------------------------------

def _refusals(answer: dict[str, Any], other: dict[str, Any]) -> list[tuple[str, Any]]:
    mine, theirs = answer["consumers"][0]["durable"], other["consumers"][0]["durable"]

    async def bind(c: Client, durable: str) -> None:
        sub = await c.js.pull_subscribe(subjects.project_events("B"), durable=durable, stream=EVENTS)
        await sub.fetch(1, timeout=1)

    return [
        ("bind another project's durable", lambda c: bind(c, theirs)),
        ("publish an event of its project", lambda c: c.js.publish(subjects.event("A", "j1", "finished"), b"{}")),
        ("publish a log batch", lambda c: c.nc.publish(subjects.log("A", "j1"), b"{}")),
        ("publish a start command", lambda c: c.js.publish(subjects.start("default"), b"{}")),
        ("publish a cancel", lambda c: c.nc.publish(subjects.cancel("j1"), b"{}")),
        ("publish an audit record", lambda c: c.nc.publish(subjects.audit("A", "job_started"), b"{}")),
        ("delete the event stream", lambda c: c.js.delete_stream(EVENTS)),
        ("purge the event stream", lambda c: c.js.purge_stream(EVENTS)),
        ("delete its own durable", lambda c: c.js.delete_consumer(EVENTS, mine)),
        ("widen its durable to every project", lambda c: c.js.add_consumer(EVENTS, jsa.ConsumerConfig(
            name=mine, durable_name=mine, filter_subject=subjects.EVENTS_ALL))),
        ("create a consumer", lambda c: c.js.add_consumer(EVENTS, jsa.ConsumerConfig(
            filter_subject=subjects.project_events("A")))),
        ("subscribe to its project's subjects", lambda c: c.nc.subscribe(subjects.project_events("A"))),
        ("read stream info", lambda c: c.js.stream_info(EVENTS)),
    ]


def test_the_server_refuses_everything_else(world: dict[str, Any]) -> None:
    answer = issue(world, "probe")
    other = issue(world, "probe", project="B")
    for what, call in _refusals(answer, other):
        async def attempt() -> str:
            c = await reader(answer, label=what)
            try:
                return await c.refused(call(c))
            finally:
                await c.close()

        assert "permissions violation" in world["loop"].run(attempt()), what

    async def intact() -> None:  # nothing the refused calls tried happened
        prov = await client(world["server"], "provisioner")
        info = await prov.js.consumer_info(EVENTS, answer["consumers"][0]["durable"])
        assert info.config.filter_subject == "kiln.evt.A.>"
        assert (await prov.js.stream_info(EVENTS)).state.messages > 0
        await prov.close()

    world["loop"].run(intact())


# -- who may ------------------------------------------------------------------------------------------------------

def test_only_the_projects_admins_may_issue_list_and_revoke(world: dict[str, Any]) -> None:
    owner, users = world["owner"], world["users"]
    cred = issue(world, "guarded")
    calls = [("POST", "/api/v1/projects/A/event-credentials", {"name": "sneaky"}),
             ("GET", "/api/v1/projects/A/event-credentials", None),
             ("DELETE", f"/api/v1/projects/A/event-credentials/{cred['id']}", None)]
    for role in ("viewer", "member"):
        for method, url, body in calls:
            r = owner.request(method, url, json=body, headers=bearer(users[("A", role)][1]))
            assert r.status_code == 403, (role, method, r.text)
            assert f"your role in project 'A' is {role}" in r.json()["detail"]
    for method, url, body in calls:  # another project's admin: as if project A did not exist
        r = owner.request(method, url, json=body, headers=bearer(users[("B", "admin")][1]))
        assert r.status_code == 404 and r.json()["detail"] == "project 'A' not found", (method, r.text)
    r = owner.delete(f"/api/v1/projects/B/event-credentials/{cred['id']}", headers=admin(world, "B"))
    assert r.status_code == 404  # B's admin naming A's credential under B: not found either
    listed = owner.get("/api/v1/projects/A/event-credentials", headers=admin(world)).json()
    assert "sneaky" not in {c["name"] for c in listed}
    assert next(c for c in listed if c["id"] == cred["id"])["status"] == "active"


def test_the_list_shows_creator_and_expiry_and_never_the_secret(world: dict[str, Any]) -> None:
    cred = issue(world, "listed", days=30)
    r = world["owner"].get("/api/v1/projects/A/event-credentials", headers=admin(world))
    assert r.status_code == 200
    row = next(c for c in r.json() if c["id"] == cred["id"])
    assert row["created_by"] == world["users"][("A", "admin")][0] and row["created_by_name"] == "a-admin"
    assert row["expires_at"] == cred["expires_at"] and row["status"] == "active"
    assert row["consumers"] == cred["consumers"] and row["public_key"] == cred["public_key"]
    assert not {"creds", "inbox_prefix", "seed", "jwt"} & set(row)
    assert "BEGIN" not in r.text and "SU" not in re.sub(r"\bU[A-Z0-9]{55}\b", "", r.text.replace("STATUS", ""))
    assert all(c["project"] == "A" for c in r.json())
    b = world["owner"].get("/api/v1/projects/B/event-credentials", headers=admin(world, "B")).json()
    assert b and all(c["project"] == "B" for c in b)


# -- revoking -------------------------------------------------------------------------------------------------------

def test_revoking_cuts_a_connected_reader_off_within_a_second_and_deletes_its_durables(world: dict[str, Any]) -> None:
    answer = issue(world, "victim")
    bystander = issue(world, "bystander")
    loop = world["loop"]

    async def connect_both() -> tuple[Client, Client]:
        v = await reader(answer, "victim", allow_reconnect=False)
        await drain(v, answer)
        b = await reader(bystander, "bystander")
        return v, b

    v, b = loop.run(connect_both())
    t0 = time.monotonic()
    r = world["owner"].delete(f"/api/v1/projects/A/event-credentials/{answer['id']}", headers=admin(world))
    assert r.status_code == 204, r.text
    deadline = t0 + 1.0
    while v.closed_at is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert v.closed_at is not None and v.closed_at - t0 < 1.0, "the revoked reader stayed connected"
    print(f"revoked through the API: connection closed {(v.closed_at - t0) * 1000:.0f} ms after the DELETE was sent")
    assert "authorization violation" in repr(v.nc.last_error).lower() or "revoked" in repr(v.nc.last_error).lower()

    async def after() -> None:
        assert "Authorization Violation" in await refused_connect(answer["nats_urls"][0], answer["creds"])
        assert b.nc.is_connected and b.violations() == []
        assert await drain(b, bystander) is not None  # the other reader still reads
        await b.close()
        prov = await client(world["server"], "provisioner")
        for c in answer["consumers"]:
            with pytest.raises(NotFoundError):
                await prov.js.consumer_info(c["stream"], c["durable"])
        await prov.close()

    loop.run(after())
    listed = world["owner"].get("/api/v1/projects/A/event-credentials", headers=admin(world)).json()
    row = next(c for c in listed if c["id"] == answer["id"])
    assert row["status"] == "revoked" and row["revoked_at"] is not None
    again = world["owner"].delete(f"/api/v1/projects/A/event-credentials/{answer['id']}", headers=admin(world))
    assert again.status_code == 404
    # the name is free again, with a fresh durable
    assert world["owner"].post("/api/v1/projects/A/event-credentials", json={"name": "victim"},
                               headers=admin(world)).status_code == 201


def test_a_revocation_survives_the_trust_directory_being_reloaded(world: dict[str, Any]) -> None:
    """The revocation list is in the trust directory `kiln up` keeps: setting the chain up again keeps it."""
    from kiln_contracts.natsauth.trust import setup_trust

    answer = issue(world, "gone")
    assert world["owner"].delete(f"/api/v1/projects/A/event-credentials/{answer['id']}",
                                 headers=admin(world)).status_code == 204
    chain = setup_trust(world["server"].chain.root)
    assert answer["public_key"] in chain.state["revocations"]
    assert chain.state["revocations"][answer["public_key"]]["until"] == int(
        datetime.fromisoformat(answer["expires_at"]).timestamp())


def test_audit_rows_and_bus_events(world: dict[str, Any]) -> None:
    answer = issue(world, "audited")
    assert world["owner"].delete(f"/api/v1/projects/A/event-credentials/{answer['id']}",
                                 headers=admin(world)).status_code == 204
    records = world["owner"].get("/api/v1/projects/A/audit", headers=admin(world)).json()
    mine = {r["action"]: r for r in records if r["target"] == f"event-credentials:{answer['id']}"}
    assert set(mine) == {"event_credentials_created", "event_credentials_revoked"}
    created = mine["event_credentials_created"]
    assert created["actor"] == world["users"][("A", "admin")][0] and created["project"] == "A"
    assert created["details"]["name"] == "audited" and created["details"]["public_key"] == answer["public_key"]
    assert created["details"]["durables"] == ["tp-A-audited", "tp-A-audited"]

    async def on_the_bus() -> dict[str, str]:
        prov = await client(world["server"], "provisioner")
        got = {}
        for action in mine:
            msg = await prov.js.get_last_msg(streams.AUDIT.name or "", subjects.audit("A", action))
            got[action] = json.loads(msg.data)["target"]
        await prov.close()
        return got

    assert world["loop"].run(on_the_bus()) == {a: f"event-credentials:{answer['id']}" for a in mine}


# -- the documented subscriber ------------------------------------------------------------------------------------

def _doc_example() -> str:
    text = (ROOT / "docs" / "events.md").read_text()
    block = re.search(r"<!-- example: third-party-subscriber -->\n```python\n(.*?)```", text, re.S)
    assert block, "docs/events.md lost its subscriber example"
    return block.group(1)


def test_the_subscriber_in_docs_events_md_runs(world: dict[str, Any]) -> None:
    answer = issue(world, "docs")
    tmp: Path = world["tmp"]
    (tmp / "subscriber.py").write_text(_doc_example())
    (tmp / "acme.json").write_text(json.dumps(answer))
    (tmp / "acme.creds").write_text(answer["creds"])
    (tmp / "acme.creds").chmod(0o600)
    run = subprocess.run([sys.executable, str(tmp / "subscriber.py"), str(tmp / "acme.json"), str(tmp / "acme.creds"),
                          str(ROOT / "docs" / "events.schema.json"), "--once"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = [line.split() for line in run.stdout.splitlines()]
    assert lines and all(line[0] == "A" for line in lines), run.stdout
    assert set(world["jobs"]["A"]) <= {line[1] for line in lines}, run.stdout  # every A job's events, validated
    assert not set(world["jobs"]["B"]) & {line[1] for line in lines}
    assert ["A", world["jobs"]["A"][0], "1", "status", "queued"] in lines
    assert "not a Kiln event" not in run.stderr


def test_the_views_doctest() -> None:
    from kiln_api.routes import event_credentials

    assert doctest.testmod(event_credentials).failed == 0


# -- secrets ------------------------------------------------------------------------------------------------------

def _secrets(answer: dict[str, Any], window: int = 20) -> list[str]:
    """Every ``window``-character piece of the seed and of the JWT's signature (the JWT's header and payload are
    not secret, and its header is the same in every JWT), and the whole token: a partial leak is found too."""
    jwt, seed = re.findall(r"-----\n(.+?)\n------", answer["creds"])
    signature = jwt.split(".")[2]
    return [jwt] + [text[i:i + window] for text in (seed, signature) for i in range(len(text) - window + 1)]


def test_the_creds_are_in_no_log_no_stream_and_not_in_the_database(world: dict[str, Any]) -> None:
    issued = world["issued"]
    assert len(issued) >= 8
    secrets = [s for a in issued for s in _secrets(a)]
    assert all(len(s) >= 20 for s in secrets) and len(secrets) > 8 * 100
    logged = "\n".join(world["log"].lines)
    assert "POST http://testserver/api/v1/projects/A/event-credentials" in logged  # the capture saw the requests
    assert "revoked NATS user" in logged  # and the API's own lines
    assert not [s for s in secrets if s in logged]

    async def every_message() -> list[bytes]:
        prov = await client(world["server"], "provisioner")
        out: list[bytes] = []
        for name in await prov.js.streams_info():
            info = await prov.js.stream_info(name.config.name)
            for seq in range(max(1, info.state.first_seq), info.state.last_seq + 1):
                try:
                    msg = await prov.js.get_msg(name.config.name, seq)
                except NotFoundError:
                    continue
                out.append((msg.data or b"") + json.dumps(msg.headers or {}).encode())
        await prov.close()
        return out

    stored = world["loop"].run(every_message())
    assert len(stored) > 10
    blob = b"\n".join(stored)
    assert b"event_credentials_created" in blob  # the audit events were searched too
    assert not [s for s in secrets if s.encode() in blob]
    db = (world["tmp"] / "k.db").read_bytes() + b"".join(
        p.read_bytes() for p in world["tmp"].glob("k.db-*"))  # the WAL too
    assert issued[0]["public_key"].encode() in db
    assert not [s for s in secrets if s.encode() in db]


# -- without NATS auth ----------------------------------------------------------------------------------------------

def test_without_nats_auth_settings_the_routes_answer_503_with_the_reason(nats_url: str, tmp_path: Path) -> None:
    with api_client(tmp_path, nats_url=nats_url) as owner:
        for method, url, body in (("POST", "/api/v1/projects/default/event-credentials", {"name": "acme"}),
                                  ("GET", "/api/v1/projects/default/event-credentials", None),
                                  ("DELETE", "/api/v1/projects/default/event-credentials/evc_x", None)):
            r = owner.request(method, url, json=body)
            assert r.status_code == 503, (method, r.text)
            assert "KILN_API_NATS_TRUST_DIR" in r.json()["detail"] and "not available" in r.json()["detail"]


def test_a_trust_directory_that_cannot_issue_or_revoke_stops_the_start(tmp_path: Path) -> None:
    from kiln_api.adapters.event_creds import NotConfigured
    from kiln_contracts.natsauth.trust import setup_trust

    chain = setup_trust(tmp_path / "trust")
    base = {"nats_url": "nats://127.0.0.1:1", "nats_creds_file": chain.creds_path("api"), "nats_trust_dir": chain.root}
    for overrides, reason in (({"nats_third_party_seed_file": chain.seed_path("trainer")}, "not the account's"),
                              ({"nats_account": chain.system_account}, "is not the account of")):
        with pytest.raises(NotConfigured, match=reason):  # before it even connects to NATS
            with api_client(tmp_path, **base, **overrides):
                pass
    chain.creds_path("sys").unlink()
    with pytest.raises(NotConfigured, match="sys.creds"):
        with api_client(tmp_path, **base):
            pass
