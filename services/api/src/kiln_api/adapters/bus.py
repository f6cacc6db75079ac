"""Publishing commands and the API's own events on NATS."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from kiln_contracts import (
    AuditRecorded, CancelJob, Event, ExitClass, JobFinished, JobStatus, StartJob, streams, subjects,
)
from kiln_contracts.natsauth import jsapi, permissions, provision
from kiln_contracts.natsauth.client import NatsTls, servers
from kiln_contracts.service import publish_attempt

log = logging.getLogger("kiln.api.bus")
PROVISION_HINT = ("with NATS credentials the API does not create streams or buckets: run the provisioning step "
                  "first (`kiln up` does; elsewhere kiln_contracts.natsauth.provision.provision(js, pools) with "
                  "the provisioner's creds)")


class NotProvisioned(RuntimeError):
    """Streams or buckets the API needs are missing and its creds may not create them."""


async def _missing(js: JetStreamContext) -> list[str]:
    missing = await provision.missing_streams(js, permissions.api().streams)
    try:
        await js.stream_info(jsapi.kv_stream(streams.CLAIMS_BUCKET))
    except NotFoundError:
        missing.append(jsapi.kv_stream(streams.CLAIMS_BUCKET))
    return missing


async def await_provisioned(js: JetStreamContext, wait_s: float, every_s: float = 2.0) -> None:
    """Return once the API's streams and its bucket exist (``STREAM.INFO`` only); after ``wait_s`` raise
    :class:`NotProvisioned`, naming what is missing and the step that makes it."""
    deadline = time.monotonic() + wait_s
    while missing := await _missing(js):
        problem = f"NATS streams missing: {', '.join(missing)}; {PROVISION_HINT}"
        if time.monotonic() >= deadline:
            raise NotProvisioned(problem)
        log.warning("%s; checking again in %gs", problem, every_s)
        await asyncio.sleep(every_s)


class Bus:
    def __init__(self, nc: NATS, kv: KeyValue) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.kv = kv

    @classmethod
    async def connect(cls, url: str, creds_file: Path | None = None, inbox_prefix: str | None = None,
                      streams_wait_s: float = 0.0, tls: NatsTls | None = None) -> "Bus":
        """Connect; without ``creds_file`` create or update the streams as before, with it (least privilege: the
        server refuses stream changes) wait up to ``streams_wait_s`` for the provisioning step to have made them."""
        options: dict[str, Any] = {}
        if creds_file is not None:
            options = {"user_credentials": str(creds_file), "inbox_prefix": inbox_prefix or permissions.api().inbox}
        context = tls.context() if tls is not None else None
        if context is not None:
            options["tls"] = context
        nc = await nats.connect(servers(url), name="kiln-api", max_reconnect_attempts=-1, connect_timeout=5,
                                **options)
        js = nc.jetstream()
        try:
            if creds_file is None:
                await streams.ensure_streams(js)
            else:
                await await_provisioned(js, streams_wait_s)
            return cls(nc, await js.key_value(streams.CLAIMS_BUCKET))
        except BaseException:
            await nc.close()
            raise

    async def close(self) -> None:
        await self.nc.drain()

    async def _event(self, ev: Event) -> None:
        await self.js.publish(ev.subject, ev.to_bytes(), headers=ev.headers(), timeout=5)

    async def publish_audit(self, rec: AuditRecorded) -> None:
        await self.js.publish(rec.subject, rec.model_dump_json().encode(), headers={"Nats-Msg-Id": rec.id},
                              timeout=5)

    async def publish_start(self, cmd: StartJob, why: str | None = None) -> None:
        """Publish the start command (stored once per job attempt thanks to its message id) and ``queued``."""
        await publish_attempt(self.js, cmd, source="api",
                              reason=(f"{why}; " if why else "") + f"waiting for a runner of pool {cmd.spec.pool}")

    async def request_cancel(self, job_id: str, project: str, attempt: int, reason: str, queued: bool) -> None:
        """Mark the job cancelled for runners (KV, checked before spawning) and tell a running one (core NATS)."""
        await self.kv.put(streams.cancel_key(job_id), reason.encode())
        await self.nc.publish(subjects.cancel(job_id), CancelJob(job_id=job_id, reason=reason).model_dump_json().encode())
        if queued:  # no runner holds it yet: the API records the end itself; a later claim sees the KV mark
            await self._event(Event.single(
                id=f"{job_id}-{attempt}-cancelled", job_id=job_id, project=project, attempt=attempt, source="api",
                data=JobFinished(status=JobStatus.cancelled, reason=reason, exit_class=ExitClass.cancelled),
            ))
