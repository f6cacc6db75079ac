"""Publishing commands and the API's own events on NATS."""

from __future__ import annotations

import nats
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from kiln_contracts import (
    AuditRecorded, CancelJob, Event, ExitClass, JobFinished, JobStatus, JobStatusChanged, StartJob, streams, subjects, utcnow,
)


class Bus:
    def __init__(self, nc: NATS, kv: KeyValue) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.kv = kv

    @classmethod
    async def connect(cls, url: str) -> "Bus":
        nc = await nats.connect(url, name="kiln-api", max_reconnect_attempts=-1, connect_timeout=5)
        js = nc.jetstream()
        await streams.ensure_streams(js)
        return cls(nc, await js.key_value(streams.CLAIMS_BUCKET))

    async def close(self) -> None:
        await self.nc.drain()

    async def _event(self, ev: Event) -> None:
        await self.js.publish(ev.subject, ev.to_bytes(), headers=ev.headers(), timeout=5)

    async def publish_audit(self, rec: AuditRecorded) -> None:
        await self.js.publish(rec.subject, rec.model_dump_json().encode(), headers={"Nats-Msg-Id": rec.id},
                              timeout=5)

    async def publish_start(self, cmd: StartJob, why: str | None = None) -> None:
        """Publish the start command (stored once per job attempt thanks to its message id) and ``queued``."""
        await self.js.publish(cmd.subject, cmd.model_dump_json().encode(), headers={"Nats-Msg-Id": cmd.msg_id},
                              timeout=5)
        await self._event(Event(
            id=f"{cmd.job_id}-{cmd.attempt}-queued", time=cmd.issued_at, job_id=cmd.job_id, project=cmd.spec.project,
            attempt=cmd.attempt, source="api", seq=1,
            data=JobStatusChanged(status=JobStatus.queued, reason=(f"{why}; " if why else "")
                                  + f"waiting for a runner of pool {cmd.spec.pool}"),
        ))

    async def request_cancel(self, job_id: str, project: str, attempt: int, reason: str, queued: bool) -> None:
        """Mark the job cancelled for runners (KV, checked before spawning) and tell a running one (core NATS)."""
        await self.kv.put(streams.cancel_key(job_id), reason.encode())
        await self.nc.publish(subjects.cancel(job_id), CancelJob(job_id=job_id, reason=reason).model_dump_json().encode())
        if queued:  # no runner holds it yet: the API records the end itself; a later claim sees the KV mark
            await self._event(Event(
                id=f"{job_id}-{attempt}-cancelled", time=utcnow(), job_id=job_id, project=project, attempt=attempt,
                source="api", seq=2,
                data=JobFinished(status=JobStatus.cancelled, reason=reason, exit_class=ExitClass.cancelled),
            ))
