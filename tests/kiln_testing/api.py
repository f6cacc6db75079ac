"""Helpers for tests of the API (no tests here): settings with authentication on, and signed-in clients."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from kiln_api.app import create_app
from kiln_api.auth.keys import new_api_key
from kiln_api.settings import Settings
from kiln_contracts import tickets

OWNER_KEY = new_api_key().secret
"""The owner's key of every API these helpers build (created on the API's first start)."""
TICKET_PRIVATE, TICKET_PUBLIC = tickets.generate_keypair()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def api_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """API settings for a test: SQLite in ``tmp_path`` unless given, authentication on, tickets signed."""
    key_file = tmp_path / "ticket-signing.pem"
    if not key_file.exists():
        key_file.write_bytes(TICKET_PRIVATE)
    base: dict[str, Any] = {"database_url": f"sqlite+aiosqlite:///{tmp_path / 'k.db'}", "sweep_interval_s": 3600,
                            "bootstrap_key": OWNER_KEY, "ticket_private_key_file": key_file}
    return Settings(**(base | overrides))


@contextmanager
def api_client(tmp_path: Path, key: str | None = OWNER_KEY, raise_server_exceptions: bool = True,
               **overrides: Any) -> Iterator[TestClient]:
    """A TestClient of a fresh API, signed in as the owner (``key=None``: no credentials)."""
    app = create_app(api_settings(tmp_path, **overrides))
    with TestClient(app, headers=bearer(key) if key else {}, raise_server_exceptions=raise_server_exceptions) as client:
        yield client


def make_user(owner: TestClient, name: str, project: str | None = None, role: str | None = None) -> tuple[str, str]:
    """Create a user (and the project, and their membership when given); returns (user id, their API key)."""
    user = owner.post("/api/v1/users", json={"name": name})
    assert user.status_code == 201, user.text
    uid = user.json()["id"]
    if project is not None:
        if owner.get(f"/api/v1/projects/{project}").status_code == 404:
            assert owner.post("/api/v1/projects", json={"id": project}).status_code == 201
        if role is not None:
            r = owner.put(f"/api/v1/projects/{project}/members/{uid}", json={"role": role})
            assert r.status_code == 200, r.text
    key = owner.post(f"/api/v1/users/{uid}/keys", json={"name": "test"}, headers=owner.headers)
    assert key.status_code == 201, key.text
    return uid, key.json()["key"]
