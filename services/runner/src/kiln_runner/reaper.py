"""The reaper: one active at a time (a KV lease), it finds attempts whose heartbeats stopped and either retries
them on another runner (bounded attempts, resuming from the last checkpoint) or marks them ``lost``.

Staleness is judged by the reaper's own clock on KV revisions that stop moving, so runner clocks never matter.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from nats.js import JetStreamContext
from nats.js.errors import APIError, KeyWrongLastSequenceError, NoKeysError, NotFoundError
from nats.js.kv import KeyValue

from kiln_contracts import Event, ExitClass, JobFinished, JobStatus, StartJob, streams, utcnow
from kiln_contracts.service import publish_attempt
from kiln_observability import job_context

from .adapters.checkpoints import resume_fields
from .metrics import RunnerMetrics

log = logging.getLogger("kiln.reaper")


class Lease:
    """Leader lease on a KV key: renewed by compare-and-set; taken over when its revision stops moving."""

    def __init__(self, kv: KeyValue, key: str, owner: str, expire_s: float) -> None:
        self.kv, self.key, self.owner, self.expire_s = kv, key, owner, expire_s
        self._rev: int | None = None
        self._seen: tuple[int, float] | None = None

    async def hold(self) -> bool:
        now = time.monotonic()
        try:
            try:
                entry = await self.kv.get(self.key)
            except NotFoundError:  # never taken, or released
                self._rev = await self.kv.create(self.key, self.owner.encode())
                return True
            if entry.value is not None and entry.value.decode() == self.owner and entry.revision == self._rev:
                self._rev = await self.kv.update(self.key, self.owner.encode(), last=entry.revision)
                return True
            if self._seen is None or self._seen[0] != entry.revision:
                self._seen = (entry.revision or 0, now)
                return False
            if now - self._seen[1] > self.expire_s:  # the holder stopped renewing: take over
                self._rev = await self.kv.update(self.key, self.owner.encode(), last=entry.revision)
                log.info("%s took over the %s lease", self.owner, self.key)
                return True
        except (KeyWrongLastSequenceError, APIError):
            return False
        return False


class Reaper:
    def __init__(self, js: JetStreamContext, running: KeyValue, leases: KeyValue, owner: str, *,
                 lost_after_s: float = 25.0, interval_s: float = 2.0, lease_s: float = 10.0,
                 metrics: RunnerMetrics | None = None) -> None:
        self.js, self.running, self.metrics = js, running, metrics
        self.lease = Lease(leases, "reaper", owner, lease_s)
        self.lost_after_s, self.interval_s = lost_after_s, interval_s
        self._seen: dict[str, tuple[int, float]] = {}

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                if await self.lease.hold():
                    await self.scan()
                else:
                    self._seen.clear()  # observations restart when leadership returns
            except Exception as exc:  # noqa: BLE001 - the reaper must outlive bus hiccups
                log.warning("reaper pass failed: %s", exc)
                # Runners could not refresh their entries either: silence is judged again once the bus is back,
                # else every attempt would be declared lost the moment a long outage ends.
                self._seen.clear()
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
            except asyncio.TimeoutError:
                pass

    async def scan(self) -> list[str]:
        now = time.monotonic()
        try:
            keys = await self.running.keys()
        except NoKeysError:
            keys = []
        reaped = []
        for key in keys:
            try:
                entry = await self.running.get(key)
            except NotFoundError:
                continue
            seen = self._seen.get(key)
            if seen is None or seen[0] != entry.revision:
                self._seen[key] = (entry.revision or 0, now)
                continue
            if now - seen[1] < self.lost_after_s:
                continue
            try:  # compare-and-delete: only one reaper acts, and not if the runner beat in the meantime
                await self.running.delete(key, last=entry.revision)
            except APIError:
                continue
            self._seen.pop(key, None)
            await self._handle_lost(json.loads(entry.value or b"{}"))
            reaped.append(key)
        for key in set(self._seen) - set(keys):
            self._seen.pop(key, None)
        return reaped

    async def _handle_lost(self, rec: dict) -> None:
        cmd = StartJob.model_validate(rec["cmd"])
        with job_context(cmd.job_id, cmd.attempt, cmd.spec.project):
            await self._lost(cmd, rec)
        if self.metrics is not None:
            self.metrics.ended("lost", ExitClass.infrastructure.value, cmd.spec.pool)
            if cmd.attempt < cmd.spec.max_attempts:
                self.metrics.retried("lost", cmd.spec.pool)

    async def _lost(self, cmd: StartJob, rec: dict) -> None:
        runner = rec.get("runner", "?")
        why = f"runner {runner} stopped sending heartbeats"
        if cmd.attempt < cmd.spec.max_attempts:
            stored = rec.get("checkpoint") if isinstance(rec.get("checkpoint"), dict) else None
            resume = resume_fields(stored) or {k: getattr(cmd, k) for k in ("resume_from", "resume_sha256",
                                                                             "resume_epoch")}
            retry = cmd.model_copy(update={"attempt": cmd.attempt + 1, "issued_at": utcnow(), **resume})
            where = f" from epoch {retry.resume_epoch} ({retry.resume_from})" if retry.resume_from else ""
            await publish_attempt(self.js, retry, source="reaper",
                                  reason=f"attempt {cmd.attempt} lost ({why}); retrying{where}")
            log.warning("job %s attempt %s lost (%s); retry as attempt %s", cmd.job_id, cmd.attempt, why, retry.attempt)
        else:
            data = JobFinished(status=JobStatus.lost, reason=why, exit_class=ExitClass.infrastructure)
            await self._event(cmd, data, f"{cmd.job_id}-{cmd.attempt}-lost")
            log.warning("job %s attempt %s lost: %s", cmd.job_id, cmd.attempt, why)

    async def _event(self, cmd: StartJob, data, event_id: str) -> None:  # type: ignore[no-untyped-def]
        ev = Event.single(id=event_id, job_id=cmd.job_id, project=cmd.spec.project, attempt=cmd.attempt,
                          source="reaper", data=data)
        await self.js.publish(ev.subject, ev.to_bytes(), headers=ev.headers())


async def open_buckets(js: JetStreamContext) -> tuple[KeyValue, KeyValue]:
    return await js.key_value(streams.RUNNING_BUCKET), await js.key_value(streams.LEASES_BUCKET)
