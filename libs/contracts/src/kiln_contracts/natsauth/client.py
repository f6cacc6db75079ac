"""A service's own NATS identity (opt-in): its creds and inbox prefix; streams checked, never created.

Without a creds file the service connects as before and creates or updates the streams itself.  With one, the
server gives it only its role's rights (``kiln_contracts.natsauth.permissions``): the provisioner has made the
streams and buckets, and the service only checks that they are there (``STREAM.INFO``).  It still creates or
updates its own durables: its creds pin their names and filters.

Used by the runner, the metrics-writer, the ClearML forwarder and the notifier.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from nats.js import JetStreamContext

from .. import streams
from .permissions import Role
from .provision import missing_streams

log = logging.getLogger("kiln.nats")
PROVISION_HINT = ("run the provisioning step first (`kiln up` does it; or kiln_contracts.natsauth.provision."
                  "provision() with the provisioner's creds)")


def inbox_prefix(configured: str | None, creds_file: Path | None, role: Role) -> str | None:
    """The inbox prefix to connect with: the configured one, else with creds the role's own, else nats-py's."""
    return configured or (role.inbox if creds_file is not None else None)


def connect_options(creds_file: Path | None, inbox: str | None) -> dict[str, str]:
    """``nats.connect`` keywords: only those set, so that without an identity it connects exactly as before."""
    options = {"user_credentials": str(creds_file)} if creds_file is not None else {}
    if inbox:
        options["inbox_prefix"] = inbox
    return options


async def prepare_streams(js: JetStreamContext, creds_file: Path | None, names: tuple[str, ...],
                          wait_s: float) -> None:
    """Without creds create or update every stream (as before); with creds wait for ``names`` to exist."""
    if creds_file is None:
        await streams.ensure_streams(js)
        return
    await require_streams(js, names, wait_s)


async def require_streams(js: JetStreamContext, names: tuple[str, ...], wait_s: float, every_s: float = 2.0) -> None:
    """Return once every stream of ``names`` exists; after ``wait_s`` raise, saying what is missing and what to do."""
    deadline = time.monotonic() + wait_s
    while missing := await missing_streams(js, names):
        problem = f"NATS streams missing: {', '.join(missing)}; this identity may not create them: {PROVISION_HINT}"
        if time.monotonic() >= deadline:
            raise RuntimeError(problem)
        log.warning("%s; checking again in %gs", problem, every_s)
        await asyncio.sleep(every_s)
