"""Who may call what: 2 projects x 3 roles (+ an outsider and the owner) x every route of the OpenAPI document.

The routes come from the API's own OpenAPI document and each operation's ``x-kiln-access`` rule, so a new route is
checked the moment it exists; a route with a rule this test does not know fails it. Real API, NATS and SQLite.
"""

from __future__ import annotations

import re
from itertools import product

import pytest

from kiln_testing.api import api_client, bearer, make_user

ROLES = ("viewer", "member", "admin")
RANK = {"viewer": 1, "member": 2, "admin": 3}
SPEC = {"model": "yolov8n.yaml", "dataset": "/data/shapes", "train": {"epochs": 1, "imgsz": 64}}
AUTHZ_404 = re.compile(r"^(job|project|user) '[^']*' not found$")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Projects A and B, a viewer/member/admin in each, an outsider, a job in each project, and spare users."""
    from kiln_testing import NatsServer

    tmp = tmp_path_factory.mktemp("authz")
    nats = NatsServer(tmp / "nats")
    nats.start()
    try:
        with api_client(tmp, nats_url=nats.url, create_rate_limit="10000/minute") as owner:
            users = {}
            for project, role in product("AB", ROLES):
                users[(project, role)] = make_user(owner, f"{project.lower()}-{role}", project, role)
            users[("-", "outsider")] = make_user(owner, "outsider")
            jobs = {p: owner.post("/api/v1/jobs", json=SPEC | {"project": p}).json()["id"] for p in "AB"}
            spares = {p: make_user(owner, f"spare-{p.lower()}", p, "viewer")[0] for p in "AB"}
            yield owner, users, jobs, spares
    finally:
        nats.stop()


def operations(owner):
    doc = owner.get("/openapi.json").json()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if path.startswith("/api/v1"):
                yield method.upper(), path, op["x-kiln-access"]


def body_for(method: str, path: str, project: str) -> dict | None:
    if method not in ("POST", "PUT"):
        return None
    if path == "/api/v1/jobs":
        return SPEC | {"project": project}
    if path.endswith("/members/{user_id}"):
        return {"role": "viewer"}
    if path == "/api/v1/session":
        return {"api_key": "kiln_0123456789_" + "x" * 43}
    if path == "/api/v1/users":
        return {"name": "made-by-a-test"}
    if path == "/api/v1/projects":
        return {"id": "made-by-a-test"}
    return {}


def fill(path: str, *, job: str, project: str, user: str, key: str = "kiln_0000000000") -> str:
    return (path.replace("{job_id}", job).replace("{project_id}", project).replace("{user_id}", user)
            .replace("{key_id}", key).replace("{name}", "best.pt"))


def is_authz_denial(r) -> bool:
    if r.status_code in (401, 403):
        return True
    return r.status_code == 404 and bool(AUTHZ_404.match(r.json().get("detail", "")))


def test_every_route_declares_a_rule_this_matrix_knows(world):
    owner = world[0]
    ops = list(operations(owner))
    assert len(ops) >= 25
    assert {rule["need"] for _, _, rule in ops} <= {"public", "user", "owner", "viewer", "member", "admin", "self",
                                                    "user_admin"}


def test_without_credentials_only_public_routes_answer(world):
    owner, _, jobs, spares = world
    for method, path, rule in operations(owner):
        url = fill(path, job=jobs["A"], project="A", user=spares["A"])
        r = owner.request(method, url, json=body_for(method, path, "A"), headers={"Authorization": ""})
        if rule["need"] == "public" and path == "/api/v1/session":  # sign-in with a made-up key: refused as such
            assert r.status_code == 401 and r.json()["detail"] == "invalid API key", r.text
        elif rule["need"] == "public":
            assert r.status_code not in (401, 403), (method, path, r.text)
        else:
            assert r.status_code == 401, (method, path, r.status_code, r.text)
            assert r.headers.get("www-authenticate", "").startswith("Bearer"), (method, path)


@pytest.mark.parametrize("caller_project, caller_role", [(p, r) for p in "AB" for r in ROLES])
def test_project_routes_by_role_and_project(world, caller_project, caller_role):
    """Own project: allowed from the needed role up, else 403 with the reason; the other project: 404 always."""
    owner, users, jobs, spares = world
    _, key = users[(caller_project, caller_role)]
    checked = 0
    for method, path, rule in operations(owner):
        need = rule["need"]
        if need not in RANK:
            continue
        for target in "AB":
            url = fill(path, job=jobs[target], project=target, user=spares[target])
            r = owner.request(method, url, json=body_for(method, path, target), headers=bearer(key))
            where = (caller_project, caller_role, method, path, target, r.status_code, r.text)
            if target != caller_project:
                assert r.status_code == 404 and AUTHZ_404.match(r.json()["detail"]), where
            elif RANK[caller_role] < RANK[need]:
                assert r.status_code == 403, where
                assert f"your role in project '{target}' is {caller_role}" in r.json()["detail"], where
            else:
                assert not is_authz_denial(r), where
            checked += 1
    assert checked >= 2 * 15  # every job and project route, for both projects


def test_lists_show_only_the_callers_projects(world):
    owner, users, jobs, _ = world
    for (project, role), (_, key) in users.items():
        listed = owner.get("/api/v1/jobs", headers=bearer(key)).json()
        assert {j["project"] for j in listed} <= {project}, (project, role)
        if project in "AB":
            assert jobs[project] in {j["id"] for j in listed}
        for other in set("AB") - {project}:  # even when asked for by name
            assert owner.get("/api/v1/jobs", params={"project": other}, headers=bearer(key)).json() == []
        projects = [p["id"] for p in owner.get("/api/v1/projects", headers=bearer(key)).json()]
        assert projects == ([project] if project in "AB" else [])
        mine = owner.get("/api/v1/me", headers=bearer(key)).json()
        assert mine["roles"] == ({project: role} if project in "AB" else {})
    everything = {j["project"] for j in owner.get("/api/v1/jobs").json()}
    assert {"A", "B"} <= everything  # the owner sees every project


def test_tickets_only_for_what_the_caller_may_read(world):
    owner, users, jobs, _ = world
    for (project, _role), (_, key) in users.items():
        for target in "AB":
            r = owner.post("/api/v1/ws-tickets", json={"jobs": [jobs[target]]}, headers=bearer(key))
            assert r.status_code == (200 if target == project else 404), (project, target, r.text)
            r = owner.post("/api/v1/ws-tickets", json={"projects": [target]}, headers=bearer(key))
            assert r.status_code == (200 if target == project else 404), (project, target, r.text)


def test_owner_routes_refuse_everyone_else(world):
    owner, users, jobs, spares = world
    owner_ops = [(m, p) for m, p, rule in operations(owner) if rule["need"] == "owner"]
    assert {("GET", "/api/v1/users"), ("POST", "/api/v1/users"), ("POST", "/api/v1/projects"),
            ("GET", "/api/v1/audit")} <= set(owner_ops)
    for (_, key), (method, path) in product(users.values(), owner_ops):
        r = owner.request(method, path, json=body_for(method, path, "A"), headers=bearer(key))
        assert r.status_code == 403 and "owner" in r.json()["detail"], (method, path, r.text)


def test_keys_self_service_and_project_admins(world):
    owner, users, _, _ = world
    a_member, a_member_key = users[("A", "member")]
    a_admin, a_admin_key = users[("A", "admin")]
    b_member, _ = users[("B", "member")]
    out_id, out_key = users[("-", "outsider")]
    # self: list and create own keys (also as "me")
    assert owner.get("/api/v1/users/me/keys", headers=bearer(out_key)).status_code == 200
    made = owner.post(f"/api/v1/users/{out_id}/keys", json={"name": "ci"}, headers=bearer(out_key))
    assert made.status_code == 201 and made.json()["key"].startswith(made.json()["id"] + "_")
    assert "hash" not in made.json()
    # nobody else's keys, unless admin of a project the user is in (list and revoke, never create)
    assert owner.get(f"/api/v1/users/{a_member}/keys", headers=bearer(out_key)).status_code == 404
    assert owner.get(f"/api/v1/users/{a_member}/keys", headers=bearer(a_admin_key)).status_code == 200
    assert owner.get(f"/api/v1/users/{b_member}/keys", headers=bearer(a_admin_key)).status_code == 404
    assert owner.post(f"/api/v1/users/{a_member}/keys", json={}, headers=bearer(a_admin_key)).status_code == 404
    listed = owner.get(f"/api/v1/users/{a_member}/keys", headers=bearer(a_admin_key)).json()
    assert listed and all("hash" not in k and "key" not in k for k in listed)


def test_no_job_was_written_across_projects(world):
    """After the matrix: every audited job action was done by a member or admin of the job's project (or the owner)."""
    owner, users, _, _ = world
    allowed = {uid: (project, role) for (project, role), (uid, _) in users.items()}
    owner_id = owner.get("/api/v1/me").json()["id"]
    records = [r for r in owner.get("/api/v1/audit", params={"limit": 1000}).json() if r["action"].startswith("job_")]
    assert len(records) > 10
    for rec in records:
        if rec["actor"] == owner_id:
            continue
        project, role = allowed[rec["actor"]]
        assert project == rec["project"] and role in ("member", "admin"), rec
