"""Credentials end to end against a real API, NATS and SQLite: keys, sessions, CSRF, OIDC, limits, audit, first start."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import jwt
import nats
import pytest
from sqlalchemy import text

from kiln_api.auth.keys import new_api_key
from kiln_api.settings import Settings
from kiln_contracts import AuditRecorded, streams, tickets
from kiln_store import make_engine
from kiln_testing.api import OWNER_KEY, TICKET_PUBLIC, api_client, bearer, make_user
from kiln_testing.oidc import IdentityProvider

SPEC = {"model": "yolov8n.yaml", "dataset": "/data/shapes", "train": {"epochs": 1, "imgsz": 64}}


@pytest.fixture()
def owner(nats_server, tmp_path):
    with api_client(tmp_path, nats_url=nats_server.url) as c:
        yield c


def sql(tmp_path, statement: str, **params) -> None:
    async def run():
        engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'k.db'}")
        async with engine.begin() as conn:
            await conn.execute(text(statement), params)
        await engine.dispose()

    asyncio.run(run())


def test_keys_are_shown_once_stored_hashed_and_identified_by_their_prefix(owner, tmp_path):
    uid, key = make_user(owner, "ada", "vision", "member")
    key_id = key.split("_")[0] + "_" + key.split("_")[1]
    assert len(key) > 50 and key.startswith("kiln_")
    listed = owner.get(f"/api/v1/users/{uid}/keys").json()
    assert [k["id"] for k in listed] == [key_id] and key not in json.dumps(listed)
    db = (tmp_path / "k.db").read_bytes() + (tmp_path / "k.db-wal").read_bytes()
    assert key.encode() not in db and key_id.encode() in db  # only its hash and id are stored


@pytest.mark.parametrize("header, reason", [
    ("Bearer kiln_0123456789_" + "a" * 43, "invalid API key"),  # well formed, unknown
    ("Bearer not-a-key", "not a Kiln API key"),
    ("Basic dXNlcjpwYXNz", "Authorization must be 'Bearer"),
    ("Bearer ", "Authorization must be 'Bearer"),
])
def test_malformed_and_unknown_keys_are_401_with_the_reason(owner, header, reason):
    r = owner.get("/api/v1/jobs", headers={"Authorization": header})
    assert r.status_code == 401 and reason in r.json()["detail"]


def test_a_key_with_a_right_prefix_and_a_wrong_secret_is_refused(owner):
    _, key = make_user(owner, "ada")
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    assert owner.get("/api/v1/me", headers=bearer(forged)).json()["detail"] == "invalid API key"


def test_revocation_takes_effect_on_the_next_request_and_ends_page_sessions(owner):
    uid, key = make_user(owner, "ada", "vision", "member")
    key_id = "_".join(key.split("_")[:2])
    assert owner.get("/api/v1/me", headers=bearer(key)).status_code == 200
    session = owner.post("/api/v1/session", json={"api_key": key}, headers={"Authorization": ""})
    cookie = session.cookies["kiln_session"]
    assert owner.get("/api/v1/me", headers={"Authorization": "", "Cookie": f"kiln_session={cookie}"}).status_code == 200
    assert owner.delete(f"/api/v1/users/{uid}/keys/{key_id}").status_code == 204
    r = owner.get("/api/v1/me", headers=bearer(key))
    assert r.status_code == 401 and r.json()["detail"] == f"API key {key_id} was revoked"
    r = owner.get("/api/v1/me", headers={"Authorization": "", "Cookie": f"kiln_session={cookie}"})
    assert r.status_code == 401 and "no longer valid" in r.json()["detail"]
    assert owner.post("/api/v1/ws-tickets", json={}, headers=bearer(key)).status_code == 401  # no new tickets
    assert owner.delete(f"/api/v1/users/{uid}/keys/{key_id}").status_code == 404  # twice: nothing to revoke


def test_an_expired_key_is_refused(owner, tmp_path):
    uid, key = make_user(owner, "ada")
    made = owner.post(f"/api/v1/users/{uid}/keys", json={"expires_in_days": 1}).json()
    assert owner.get("/api/v1/me", headers=bearer(made["key"])).status_code == 200
    sql(tmp_path, "UPDATE api_keys SET expires_at = '2020-01-01 00:00:00' WHERE id = :id", id=made["id"])
    r = owner.get("/api/v1/me", headers=bearer(made["key"]))
    assert r.status_code == 401 and r.json()["detail"] == f"API key {made['id']} expired"
    assert owner.get("/api/v1/me", headers=bearer(key)).status_code == 200  # the user's other key still works


def test_page_session_cookie_and_csrf(owner):
    _, key = make_user(owner, "ada", "vision", "member")
    r = owner.post("/api/v1/session", json={"api_key": key}, headers={"Authorization": ""})
    assert r.status_code == 200
    set_cookie = r.headers["set-cookie"]
    for flag in ("HttpOnly", "Secure", "SameSite=strict", "Path=/"):
        assert flag in set_cookie, set_cookie
    csrf = r.json()["csrf_token"]
    jar = {"Authorization": "", "Cookie": f"kiln_session={r.cookies['kiln_session']}"}
    assert owner.get("/api/v1/session", headers=jar).json()["csrf_token"] == csrf
    spec = SPEC | {"project": "vision"}
    no_csrf = owner.post("/api/v1/jobs", json=spec, headers=jar)
    assert no_csrf.status_code == 403 and "X-CSRF-Token" in no_csrf.json()["detail"]
    wrong = owner.post("/api/v1/jobs", json=spec, headers=jar | {"X-CSRF-Token": "x" * 43})
    assert wrong.status_code == 403
    assert owner.post("/api/v1/jobs", json=spec, headers=jar | {"X-CSRF-Token": csrf}).status_code == 201
    assert owner.delete("/api/v1/session", headers=jar | {"X-CSRF-Token": csrf}).status_code == 204
    assert owner.get("/api/v1/me", headers=jar).status_code == 401  # signed out: the old cookie is dead


def test_sign_in_refuses_a_bad_key_with_the_reason(owner):
    r = owner.post("/api/v1/session", json={"api_key": "hunter2"}, headers={"Authorization": ""})
    assert r.status_code == 401 and "not a Kiln API key" in r.json()["detail"]
    assert "set-cookie" not in r.headers


def test_request_body_limit_is_413(nats_server, tmp_path):
    with api_client(tmp_path, nats_url=nats_server.url, max_body_bytes=4096) as c:
        big = SPEC | {"name": "x" * 5000}
        r = c.post("/api/v1/jobs", json=big)
        assert r.status_code == 413 and "4096 bytes" in r.json()["detail"]

        def chunks():  # no Content-Length: the limit holds for a streamed body too
            for _ in range(10):
                yield b" " * 1000

        r = c.post("/api/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert c.post("/api/v1/jobs", json=SPEC).status_code == 201


def test_job_creation_is_rate_limited_per_key(nats_server, tmp_path):
    with api_client(tmp_path, nats_url=nats_server.url, create_rate_limit="3/minute") as c:
        _, other = make_user(c, "ada", "default", "member")
        codes = [c.post("/api/v1/jobs", json=SPEC).status_code for _ in range(4)]
        assert codes == [201, 201, 201, 429]
        r = c.post("/api/v1/jobs", json=SPEC)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1 and "3 per 1 minute" in r.json()["detail"]
        assert c.post("/api/v1/jobs", json=SPEC, headers=bearer(other)).status_code == 201  # per key
        assert c.get("/api/v1/jobs").status_code == 200  # reads are not limited


def test_audit_records_reach_the_table_and_the_bus(owner, nats_server):
    uid, key = make_user(owner, "ada", "vision", "member")
    job = owner.post("/api/v1/jobs", json=SPEC | {"project": "vision", "start": True}, headers=bearer(key)).json()
    owner.post(f"/api/v1/jobs/{job['id']}/cancel", headers=bearer(key))
    rows = owner.get("/api/v1/projects/vision/audit").json()
    actions = [r["action"] for r in reversed(rows)]
    assert actions == ["project_created", "member_set", "job_created", "job_started", "job_cancelled"], actions
    assert {r["actor_name"] for r in rows if r["action"].startswith("job_")} == {"ada"}
    assert owner.get("/api/v1/projects/vision/audit", headers=bearer(key)).status_code == 403  # admins only

    async def from_the_bus():
        nc = await nats.connect(nats_server.url)
        sub = await nc.jetstream().subscribe("kiln.audit.>", stream=streams.AUDIT.name, ordered_consumer=True)
        got = []
        try:
            while True:
                got.append(AuditRecorded.model_validate_json((await sub.next_msg(timeout=2)).data))
        except nats.errors.TimeoutError:
            return got
        finally:
            await nc.close()

    on_bus = asyncio.run(from_the_bus())
    assert {r.id for r in on_bus} >= {r["id"] for r in rows}
    assert any(r.action.value == "key_created" and r.project is None for r in on_bus)
    everything = json.dumps([r.model_dump(mode="json") for r in on_bus]) + json.dumps(rows)
    assert key not in everything and OWNER_KEY not in everything  # ids only, never secrets


def test_tickets_are_short_lived_signed_and_scoped(owner):
    _, key = make_user(owner, "ada", "vision", "viewer")
    job = owner.post("/api/v1/jobs", json=SPEC | {"project": "vision"}).json()
    answer = owner.post("/api/v1/ws-tickets", json={"jobs": [job["id"]], "projects": ["vision"]}, headers=bearer(key))
    assert answer.status_code == 200
    t = tickets.verify(answer.json()["ticket"], TICKET_PUBLIC)
    assert t.jobs == {job["id"]: "vision"} and t.projects == ["vision"] and t.exp - t.iat <= 60
    assert t.key.startswith("kiln_") and key not in answer.json()["ticket"]
    assert answer.json()["renew_within_s"] == 300
    refused = owner.post("/api/v1/ws-tickets", json={"jobs": [job["id"], "nope"], "projects": ["vision", "other"]},
                         headers=bearer(key))
    assert refused.status_code == 404 and refused.json()["not_found"] == ["job:nope", "project:other"]
    assert refused.json()["detail"] == "not found: job 'nope', project 'other'"
    bad = owner.post("/api/v1/ws-tickets", json={"jobs": ["../etc"]}, headers=bearer(key))
    assert bad.status_code == 422


def test_first_start_writes_the_owner_key_file_0600_once(nats_server, tmp_path):
    key_file = tmp_path / "secrets" / "owner.key"
    with api_client(tmp_path, key=None, nats_url=nats_server.url, bootstrap_key=None,
                    bootstrap_key_file=key_file) as c:
        key = key_file.read_text().strip()
        assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
        me = c.get("/api/v1/me", headers=bearer(key)).json()
        assert me["is_owner"] and me["name"] == "owner"
    with api_client(tmp_path, key=None, nats_url=nats_server.url, bootstrap_key=None,
                    bootstrap_key_file=key_file) as c:  # second start: the same owner and key, no new one
        assert key_file.read_text().strip() == key
        assert len(c.get("/api/v1/users", headers=bearer(key)).json()) == 1


def test_auth_off_is_refused_beyond_loopback():
    with pytest.raises(ValueError, match="without authentication"):
        Settings(host="0.0.0.0", auth="off")
    assert Settings(host="0.0.0.0").auth == "on"
    with pytest.raises(ValueError, match="not a Kiln API key"):
        asyncio.run(_bootstrap_with("hunter2"))


async def _bootstrap_with(key: str) -> None:
    from kiln_api.auth.bootstrap import ensure_owner

    await ensure_owner(None, Settings(bootstrap_key=key))  # type: ignore[arg-type]


# -- OIDC: a key pair and a JWKS endpoint made here, no outside identity provider ----------------------------------


@pytest.fixture()
def issuer():
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())) | {"kid": "k1", "use": "sig", "alg": "RS256"}
    body = json.dumps({"keys": [jwk]}).encode()

    class JWKS(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), JWKS)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield key, f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
    server.shutdown()


def token(key, **claims) -> str:
    now = int(time.time())
    base = {"iss": "https://idp.example", "aud": "kiln", "sub": "ada@example", "iat": now, "exp": now + 300}
    return jwt.encode(base | claims, key, algorithm="RS256", headers={"kid": "k1"})


def test_oidc_access_tokens(nats_server, tmp_path, issuer):
    from cryptography.hazmat.primitives.asymmetric import rsa

    key, jwks = issuer
    with api_client(tmp_path, nats_url=nats_server.url, oidc_issuer="https://idp.example", oidc_audience="kiln",
                    oidc_jwks_url=jwks, oidc_leeway_s=30) as c:
        c.post("/api/v1/users", json={"name": "ada", "oidc_subject": "ada@example"})
        ok = c.get("/api/v1/me", headers=bearer(token(key)))
        assert ok.status_code == 200 and ok.json()["name"] == "ada" and ok.json()["via"] == "oidc"
        skewed = token(key, iat=int(time.time()) + 20, exp=int(time.time()) - 10)  # within the 30 s leeway
        assert c.get("/api/v1/me", headers=bearer(skewed)).status_code == 200
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cases = {
            "expired": token(key, exp=int(time.time()) - 120),
            "wrong audience": token(key, aud="someone-else"),
            "wrong issuer": token(key, iss="https://evil.example"),
            "wrong signature": token(other),
            "unknown user": token(key, sub="mallory@example"),
        }
        for what, t in cases.items():
            r = c.get("/api/v1/me", headers=bearer(t))
            assert r.status_code == 401, (what, r.text)
            assert t not in r.text
        assert "expired" in c.get("/api/v1/me", headers=bearer(cases["expired"])).json()["detail"]
        # an OIDC user has exactly the roles of their memberships
        assert c.post("/api/v1/jobs", json=SPEC, headers=bearer(token(key))).status_code == 404


def test_a_new_key_has_at_least_128_random_bits():
    secrets_part = {new_api_key().secret.split("_", 2)[2] for _ in range(200)}
    assert len(secrets_part) == 200 and all(len(s) == 43 for s in secrets_part)  # 32 bytes = 256 bits


def test_page_sign_in_through_oidc(nats_server, tmp_path):
    idp = IdentityProvider()
    try:
        with api_client(tmp_path, nats_url=nats_server.url, oidc_issuer=idp.issuer, oidc_client_id="kiln-page",
                        cookie_secure=False) as c:
            assert c.get("/api/v1/config").json()["oidc_login"] is True
            c.post("/api/v1/users", json={"name": "ada", "oidc_subject": "ada@example"})

            def sign_in(tamper=None):
                start = c.get("/api/v1/session/oidc", headers={"Authorization": ""}, follow_redirects=False)
                assert start.status_code == 302 and start.headers["location"].startswith(idp.issuer + "/authorize")
                assert "code_challenge_method=S256" in start.headers["location"]
                back = httpx.get(start.headers["location"], follow_redirects=False).headers["location"]
                callback = back.replace("http://testserver", "")
                return c.get(tamper(callback) if tamper else callback, headers={"Authorization": ""},
                             follow_redirects=False)

            done = sign_in()
            assert done.status_code == 303 and done.headers["location"] == "/"
            me = c.get("/api/v1/me", headers={"Authorization": ""})
            assert me.status_code == 200 and me.json()["name"] == "ada" and me.json()["via"] == "session"
            c.cookies.clear()
            wrong_state = sign_in(lambda url: url.replace("state=", "state=x"))
            assert "signin_error=" in wrong_state.headers["location"] and "state" in wrong_state.headers["location"]
            assert c.get("/api/v1/me", headers={"Authorization": ""}).status_code == 401
            urls = []
            assert sign_in(lambda url: urls.append(url) or url).headers["location"] == "/"
            c.cookies.clear()
            c.get("/api/v1/session/oidc", headers={"Authorization": ""}, follow_redirects=False)  # a new flow cookie
            replayed = c.get(urls[0], headers={"Authorization": ""}, follow_redirects=False)  # the old callback again
            assert "signin_error=" in replayed.headers["location"]
            assert c.get("/api/v1/me", headers={"Authorization": ""}).status_code == 401
            c.cookies.clear()
            idp.subject = "mallory@example"
            stranger = sign_in()
            assert "no%20active%20Kiln%20user" in stranger.headers["location"]
            assert c.get("/api/v1/me", headers={"Authorization": ""}).status_code == 401
    finally:
        idp.close()
