"""Test helpers: a real nats-server process, free ports, PostgreSQL databases."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path


from kiln_local.stack import free_port, nats_server_bin  # one definition, shared with `kiln up`

__all__ = ["free_port", "nats_server_bin", "NatsServer", "MotoS3", "pg_admin_url", "pg_create_db", "pg_drop_db",
           "wait_for_port", "stop_process"]


class NatsServer:
    """A nats-server with JetStream on a free loopback port and its own store folder; can stop and restart."""

    def __init__(self, store: Path, port: int | None = None) -> None:
        self.store = Path(store)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [nats_server_bin(), "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, self.proc)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None,
                  timeout: float = 10.0) -> None:
    """Return once something listens on 127.0.0.1:``port``; fail at once if ``proc`` exits (with ``log``'s tail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("nats-server exited" + (f": {log.read_text()[-3000:]}" if log else ""))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("nats-server did not start")


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL after 5 s."""
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pg_admin_url(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def pg_create_db(base_url: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(pg_admin_url(base_url), timeout=5)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def pg_drop_db(base_url: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(pg_admin_url(base_url), timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


class MotoS3:
    """moto's standalone S3-compatible server as a real process on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MotoS3":
        exe = Path(sys.executable).parent / "moto_server"
        self.proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("moto_server did not start")

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id="test",
                            aws_secret_access_key="test")

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)
