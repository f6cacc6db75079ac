"""Liveness and readiness, the same way in every service.

- ``/livez``: the process and its event loop answer (the endpoints are served from the service's own loop, so a
  blocked loop fails it).  Restart the process when it fails.
- ``/readyz``: every check passes (connected to NATS; the database answers, where one is used) and the service is
  not draining (a runner stopping on SIGTERM, an HTTP server shutting down).  Send it no work while it fails.

Example:
    >>> import asyncio
    >>> health = Health()
    >>> health.add("nats", lambda: True)
    >>> asyncio.run(health.ready())
    (True, {'nats': True, 'draining': False})
    >>> health.draining = True
    >>> asyncio.run(health.ready())[0]
    False
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("kiln.health")
Check = Callable[[], "bool | Awaitable[bool]"]
CHECK_TIMEOUT_S = 2.0


class Health:
    """Named readiness checks and a draining flag."""

    def __init__(self) -> None:
        self.checks: dict[str, Check] = {}
        self.draining = False

    def add(self, name: str, check: Check) -> None:
        self.checks[name] = check

    async def ready(self) -> tuple[bool, dict[str, bool]]:
        """Whether the service is ready, and each check's result (a check that raises or hangs fails)."""
        results = {name: await _run(name, check) for name, check in self.checks.items()}
        results["draining"] = self.draining
        return all(v for k, v in results.items() if k != "draining") and not self.draining, results


async def _run(name: str, check: Check) -> bool:
    try:
        result = check()
        if inspect.isawaitable(result):
            result = await asyncio.wait_for(result, CHECK_TIMEOUT_S)
        return bool(result)
    except Exception as exc:  # noqa: BLE001 - a failing check means "not ready", never an error page
        log.debug("readiness check %s failed: %r", name, exc)
        return False


def nats_connected(nc: Any) -> Check:
    """Ready while the NATS client is connected (not while it reconnects)."""
    return lambda: bool(nc.is_connected)


def database(engine: Any) -> Check:
    """Ready while the database answers ``SELECT 1`` (SQLAlchemy async engine) within the check timeout."""

    async def check() -> bool:
        from sqlalchemy import text

        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        return True

    return check


def body(ok: bool, checks: dict[str, bool]) -> dict[str, object]:
    """The JSON answer of ``/readyz``."""
    return {"status": "ready" if ok else "not ready", "checks": checks}
