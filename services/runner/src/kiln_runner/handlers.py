"""The start-command handler and the cancel listener (thin: parse, claim, hand over to RunningJob)."""

from __future__ import annotations

import asyncio
import logging

from faststream.nats import NatsMessage
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from kiln_contracts.service import dead_letter
from kiln_contracts import CancelJob, Event, ExitClass, JobFinished, JobStatus, StartJob

from .adapters.datasets import DatasetCache
from .jobs import RunningJob
from .settings import Settings
from .slots import Slots

log = logging.getLogger("kiln.runner")


class Runner:
    def __init__(self, settings: Settings, nc: NATS, kv: KeyValue, registry: KeyValue | None = None) -> None:
        self.settings, self.nc, self.kv, self.registry = settings, nc, kv, registry
        self.datasets = DatasetCache(settings.dataset_cache or settings.work_dir / "datasets", self._s3_client,
                                     settings.s3_allowed_buckets)
        self.js = nc.jetstream()
        self.slots = Slots(settings.slots)
        self.jobs: dict[str, RunningJob] = {}
        self.tasks: set[asyncio.Task[object]] = set()
        self.draining = False
        self._drain_event = asyncio.Event()

    async def on_start(self, msg: NatsMessage) -> None:
        """Claim the attempt, take a slot, spawn, ack; return only once a slot is free again."""
        raw: Msg = msg.raw_message
        try:
            cmd = StartJob.model_validate_json(raw.data)
        except (ValidationError, ValueError) as exc:
            await dead_letter(self.nc, f"runner-{self.settings.pool}", raw, f"invalid start command: {str(exc)[:400]}",
                              terminate=False)
            await msg.reject()  # terminates it through FastStream
            return
        if self.draining:
            await msg.nack()
            return
        slot = await self.slots.take()  # immediate: this handler only runs while a slot is free
        job = RunningJob(cmd, self.settings, self.js, slot, self.registry, self.datasets)
        # Enter the running registry before the permanent claim: if this runner dies in between, the reaper
        # finds the entry going stale and retries or marks the attempt lost; it never stays "starting".
        try:
            registered = await job.register()
            claimed = registered and await self._claim(cmd)
        except Exception:
            await job.unregister()
            await self.slots.give(slot)
            raise  # not acked: the command is redelivered after the ack wait
        if not claimed:
            await job.unregister()
            await self.slots.give(slot)
            await msg.ack()
            return
        if (reason := await self._cancel_mark(cmd.job_id)) is not None:
            log.info("job %s was cancelled while queued; not starting it", cmd.job_id)
            await self._finish_unstarted(cmd, reason)
            await job.unregister()
            await self.slots.give(slot)
            await msg.ack()
            return
        self.jobs[cmd.job_id] = job
        task = asyncio.create_task(self._run(job, slot))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        await msg.ack()
        # Hold the fetch loop until a slot is free again (so nothing is fetched that cannot start), or shutdown.
        waiters = [asyncio.ensure_future(self.slots.wait_free()), asyncio.ensure_future(self._drain_event.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()

    def stop_taking_work(self) -> None:
        self.draining = True
        self._drain_event.set()

    def _s3_client(self):  # type: ignore[no-untyped-def]
        import boto3  # credentials: the runner's environment / AWS config, never the job

        return boto3.client("s3", endpoint_url=self.settings.s3_endpoint_url, region_name=self.settings.s3_region)

    async def _run(self, job: RunningJob, slot: int) -> None:
        try:
            await job.run()
        finally:
            self.jobs.pop(job.cmd.job_id, None)
            await self.slots.give(slot)

    async def _claim(self, cmd: StartJob) -> bool:
        """Atomic compare-and-set: exactly one runner gets to run a given job attempt."""
        try:
            await self.kv.create(f"{cmd.job_id}.{cmd.attempt}", self.settings.runner_id.encode())
            return True
        except KeyWrongLastSequenceError:
            log.info("job %s attempt %s already claimed; dropping duplicate start", cmd.job_id, cmd.attempt)
            return False

    async def _cancel_mark(self, job_id: str) -> str | None:
        try:
            entry = await self.kv.get(f"{job_id}.cancel")
        except (NotFoundError, Exception):  # nats-py raises KeyNotFoundError (a NotFoundError)
            return None
        return (entry.value or b"").decode() or "cancelled by user"

    async def _finish_unstarted(self, cmd: StartJob, reason: str) -> None:
        ev = Event.new(job_id=cmd.job_id, project=cmd.spec.project, attempt=cmd.attempt, seq=1, source="runner",
                       data=JobFinished(status=JobStatus.cancelled, reason=reason, exit_class=ExitClass.cancelled))
        await self.js.publish(ev.subject, ev.to_bytes(), headers=ev.headers())

    async def on_cancel(self, raw: Msg) -> None:
        try:
            cmd = CancelJob.model_validate_json(raw.data)
        except (ValidationError, ValueError):
            return
        job = self.jobs.get(cmd.job_id)
        if job is not None:
            log.info("cancelling job %s: %s", cmd.job_id, cmd.reason)
            job.cancel(cmd.reason)

    async def drain(self, grace_s: float) -> None:
        """Stop taking work; give running jobs ``grace_s`` to finish, then hand them back for another runner."""
        self.stop_taking_work()
        if self.tasks:
            done, pending = await asyncio.wait(set(self.tasks), timeout=grace_s)
            for job in list(self.jobs.values()):
                job.hand_back = True
                job.cancel("runner shut down before the job finished")
            if pending:
                await asyncio.wait(pending, timeout=self.settings.cancel_grace_s + self.settings.kill_grace_s + 10)
