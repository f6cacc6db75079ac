"""Test helpers for the metrics-writer: the writer as a real process, a database lock that keeps its commits
waiting, and waiting until its durables have acked everything."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DURABLES = (("KILN_EVENTS", "metrics-writer-events"), ("KILN_LOGS", "metrics-writer-logs"))


class WriterProc:
    """``python -m kiln_metrics_writer``; keyword settings become ``KILN_WRITER_<NAME>`` variables."""

    def __init__(self, nats_url: str, db_url: str, log: Path, **settings: object) -> None:
        self.env = {**os.environ, "KILN_WRITER_NATS_URL": nats_url, "KILN_WRITER_DATABASE_URL": db_url,
                    **{f"KILN_WRITER_{k.upper()}": str(v) for k, v in settings.items()}}
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self._seen = 0

    def start(self) -> WriterProc:
        self._seen = self.log.stat().st_size if self.log.exists() else 0  # ready() reads only this run's lines
        with open(self.log, "ab") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([sys.executable, "-m", "kiln_metrics_writer"], env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)

    async def stop(self, timeout: float = 20) -> None:
        """SIGTERM, waiting without blocking the event loop (the proxy of a test may run in it)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        self.kill()

    async def ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while b"consuming KILN_EVENTS" not in self.log.read_bytes()[self._seen:]:
            assert self.proc and self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            await asyncio.sleep(0.05)


class DbLock:
    """Keeps the writer's commits waiting: PostgreSQL ``LOCK TABLE .. ACCESS EXCLUSIVE`` in an open transaction,
    SQLite ``BEGIN EXCLUSIVE`` (the writer waits its busy timeout, then retries)."""

    def __init__(self, db_url: str, table: str = "metric_events") -> None:
        self.db_url, self.table = db_url, table
        self._conn: Any = None

    async def acquire(self) -> DbLock:
        if self.db_url.startswith("sqlite"):
            self._conn = sqlite3.connect(self.db_url.split(":///", 1)[1], isolation_level=None)
            self._conn.execute("BEGIN EXCLUSIVE")
        else:
            import asyncpg

            self._conn = await asyncpg.connect(self.db_url.replace("postgresql+asyncpg://", "postgresql://"))
            await self._conn.execute(f"BEGIN; LOCK TABLE {self.table} IN ACCESS EXCLUSIVE MODE")
        return self

    async def release(self) -> None:
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        if isinstance(conn, sqlite3.Connection):
            conn.execute("ROLLBACK")
            conn.close()
        else:
            await conn.execute("ROLLBACK")
            await conn.close()


async def consumer_state(js: Any, stream: str = "KILN_EVENTS", durable: str = "metrics-writer-events") -> Any:
    return await js.consumer_info(stream, durable)


async def drained(js: Any) -> bool:
    """Both durables of the writer exist and have acked everything in their streams."""
    for stream, durable in DURABLES:
        try:
            info = await js.consumer_info(stream, durable)
        except Exception:  # noqa: BLE001 - not created yet
            return False
        if info.num_pending or info.num_ack_pending:
            return False
    return True


async def wait_for(pred: Any, timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(every)
