"""The start-command handler and the cancel listener (thin: parse, claim, hand over to RunningJob)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from faststream.nats import NatsMessage
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from kiln_contracts.service import dead_letter
from kiln_contracts import CancelJob, Event, ExitClass, JobFinished, JobStatus, StartJob, streams, utcnow
from kiln_observability import job_context

from .adapters.checkpoints import CheckpointFetcher
from .adapters.datasets import DatasetCache
from .adapters.spools import SpoolDrainer
from .adapters.sandbox import TrainerUsers
from .adapters.trainer_creds import TrainerCreds
from .domain import JobRef, invalid_reason, job_of_invalid_start
from .jobs import RunningJob
from .metrics import RunnerMetrics
from .settings import Settings
from .slots import Slots

log = logging.getLogger("kiln.runner")
RETRY_DELAY_S = 2.0  # a command the runner could not handle (bus or KV trouble) comes back after this, not ack_wait


class Runner:
    def __init__(self, settings: Settings, nc: NATS, kv: KeyValue, registry: KeyValue | None = None, *,
                 recheck: asyncio.Event | None = None, metrics: RunnerMetrics | None = None) -> None:
        self.settings, self.nc, self.kv, self.registry = settings, nc, kv, registry
        self.metrics = metrics
        self.datasets = DatasetCache(settings.dataset_cache or settings.work_dir / "datasets", self._s3_client,
                                     settings.s3_allowed_buckets, lambda: settings.roots)
        self.checkpoints = CheckpointFetcher(settings.artifact_dir, settings.work_dir, settings.artifact_s3_uri,
                                             self._artifact_s3_client)
        self.js = nc.jetstream()
        self.spools = SpoolDrainer(self.js, (settings.work_dir / "jobs").resolve())
        self.trainer_creds = TrainerCreds.from_settings(settings)
        base = settings.trainer_uid_base  # refused at start, with the reason, where this process cannot switch users
        self.trainer_users = TrainerUsers.checked(base, settings.slots) if base is not None else None
        self.slots = Slots(settings.slots)
        self.jobs: dict[str, RunningJob] = {}
        self.tasks: set[asyncio.Task[object]] = set()
        self.draining = False
        self._drain_event = asyncio.Event()
        self._recheck = recheck or asyncio.Event()  # set: read the cancel marks now (the runner reconnected)

    async def on_start(self, msg: NatsMessage) -> None:
        """Claim the attempt, take a slot, spawn, ack; return only once a slot is free again."""
        received = time.perf_counter()
        raw: Msg = msg.raw_message
        try:
            cmd = StartJob.model_validate_json(raw.data)
        except (ValidationError, ValueError) as exc:
            reason = invalid_reason(exc)
            try:
                if (ref := job_of_invalid_start(raw.data)) is not None:
                    with job_context(ref.job_id, ref.attempt, ref.project):
                        await self._fail_invalid(ref, reason)
                await dead_letter(self.nc, f"runner-{self.settings.pool}", raw, reason, terminate=False)
            except Exception:
                await self._retry_later(msg)
                raise
            await msg.reject()  # terminates it through FastStream
            return
        # Every line about this attempt names it, in this handler and in every task it starts.
        with job_context(cmd.job_id, cmd.attempt, cmd.spec.project):
            await self._start(msg, cmd, received)

    async def _start(self, msg: NatsMessage, cmd: StartJob, received: float) -> None:
        if self.draining:
            await msg.nack()
            return
        if cmd.not_before is not None and (wait := (cmd.not_before - utcnow()).total_seconds()) > 0:
            await msg.nack(delay=wait)  # a retry in its backoff: back on the queue until it is due
            return
        slot = await self.slots.take()  # immediate: this handler only runs while a slot is free
        job = RunningJob(cmd, self.settings, self.js, slot, self.registry, self.datasets, self.checkpoints,
                         self.spools, self.trainer_creds, self.metrics, self.trainer_users)
        # Enter the running registry before the permanent claim: if this runner dies in between, the reaper
        # finds the entry going stale and retries or marks the attempt lost; it never stays "starting".
        try:
            registered = await job.register()
            # Read the cancel mark before the claim: if the read fails, nothing is claimed yet and the command,
            # redelivered, is handled in full (a claim left behind would make it a "duplicate" never run).
            reason = await self._cancel_mark(cmd.job_id) if registered else None
            claimed = registered and await self._claim(cmd)
        except Exception:
            await job.unregister()
            await self.slots.give(slot)
            await self._retry_later(msg)
            raise
        if self.metrics is not None:
            self.metrics.claim.observe(time.perf_counter() - received)
        if not claimed:
            await job.unregister()
            await self.slots.give(slot)
            await msg.ack()
            return
        if reason is not None:
            log.info("job %s was cancelled while queued; not starting it", cmd.job_id)
            try:
                await self._finish_unstarted(cmd, reason)
            except Exception:
                await self._retry_later(msg)  # the claim is ours: the redelivery finds it and ends nothing twice
                raise
            finally:
                await job.unregister()
                await self.slots.give(slot)
            await msg.ack()
            return
        self.jobs[cmd.job_id] = job
        self._recheck.set()  # a cancel message that came after the mark was read found no job to stop
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

    def _artifact_s3_client(self):  # type: ignore[no-untyped-def]
        import boto3  # the runner's own credentials: it fetches checkpoints its trainers stored

        return boto3.client("s3", endpoint_url=self.settings.artifact_s3_endpoint, region_name=self.settings.s3_region)

    async def _run(self, job: RunningJob, slot: int) -> None:
        try:
            await job.run()
        finally:
            job.close()
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

    @staticmethod
    async def _retry_later(msg: NatsMessage) -> None:
        """Not handled: have it redelivered soon (if even the nak is lost, after the consumer's ack wait)."""
        with contextlib.suppress(Exception):
            await msg.nack(delay=RETRY_DELAY_S)

    async def _cancel_mark(self, job_id: str) -> str | None:
        """Why the job was cancelled (its KV mark, written by the API), or None when it was not.

        Only a missing key means "not cancelled": any other error propagates, so a cancelled job never starts
        because the bucket could not be read.
        """
        try:
            entry = await self.kv.get(streams.cancel_key(job_id))
        except (KeyNotFoundError, KeyDeletedError):
            return None
        return (entry.value or b"").decode() or "cancelled by user"

    async def _fail_invalid(self, ref: JobRef, reason: str) -> None:
        """End the attempt an unprocessable start command names as ``failed``: else it stays ``queued`` forever.

        The attempt is claimed first, marked as invalid, so a garbage command never ends an attempt that a runner
        holds; a redelivery (after a failed publish) finds its own mark and publishes again, under the same id.
        """
        key, mark = f"{ref.job_id}.{ref.attempt}", f"invalid start command ({self.settings.runner_id})".encode()
        try:
            await self.kv.create(key, mark)
        except KeyWrongLastSequenceError:
            held = await self.kv.get(key)
            if not (held.value or b"").startswith(b"invalid start command"):
                log.warning("invalid start command for %s attempt %s, which is already claimed: ending nothing",
                            ref.job_id, ref.attempt)
                return
        ev = Event.single(id=f"{ref.job_id}-{ref.attempt}-invalid", job_id=ref.job_id, project=ref.project,
                          attempt=ref.attempt, source="runner",
                          data=JobFinished(status=JobStatus.failed, reason=reason, exit_class=ExitClass.user_error))
        await self.js.publish(ev.subject, ev.to_bytes(), headers=ev.headers())
        log.warning("job %s attempt %s failed: %s", ref.job_id, ref.attempt, reason)

    async def _finish_unstarted(self, cmd: StartJob, reason: str) -> None:
        """End a job cancelled while queued; if NATS does not take that, give the claim back so that the
        command, redelivered, is handled again (not dropped as a duplicate)."""
        ev = Event.single(id=f"{cmd.job_id}-{cmd.attempt}-cancelled-queued", job_id=cmd.job_id,
                          project=cmd.spec.project, attempt=cmd.attempt, source="runner",
                          data=JobFinished(status=JobStatus.cancelled, reason=reason, exit_class=ExitClass.cancelled))
        try:
            await self.js.publish(ev.subject, ev.to_bytes(), headers=ev.headers())
        except Exception:
            with contextlib.suppress(Exception):
                await self.kv.delete(f"{cmd.job_id}.{cmd.attempt}")
            raise

    async def on_cancel(self, raw: Msg) -> None:
        try:
            cmd = CancelJob.model_validate_json(raw.data)
        except (ValidationError, ValueError):
            return
        job = self.jobs.get(cmd.job_id)
        if job is not None:
            with job_context(cmd.job_id, job.cmd.attempt, job.cmd.spec.project):
                log.info("cancelling job %s: %s", cmd.job_id, cmd.reason)
            job.cancel(cmd.reason)

    async def watch_cancels(self, stop: asyncio.Event) -> None:
        """Apply the KV cancel marks to running jobs: at once after a reconnect, else every ``cancel_check_s``.

        The core ``CancelJob`` message is the fast path but at most once: a runner reconnecting at that moment
        never sees it. The mark is durable, so this reaches a running attempt whatever the timing.
        """
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._recheck.wait(), self.settings.cancel_check_s)
            self._recheck.clear()
            for job_id, job in list(self.jobs.items()):
                if job.cancel_reason is not None:
                    continue
                try:
                    reason = await self._cancel_mark(job_id)
                except Exception as exc:  # noqa: BLE001 - bus trouble: the next pass (or reconnect) tries again
                    log.warning("cannot read the cancel mark of %s: %s", job_id, exc)
                    continue
                if reason is not None and self.jobs.get(job_id) is job:
                    with job_context(job_id, job.cmd.attempt, job.cmd.spec.project):
                        log.info("cancelling job %s (KV mark): %s", job_id, reason)
                    job.cancel(reason)

    async def drain(self, grace_s: float) -> None:
        """Stop taking work; give running jobs ``grace_s`` to finish, then hand them back for another runner."""
        self.stop_taking_work()
        if self.tasks:
            done, pending = await asyncio.wait(set(self.tasks), timeout=grace_s)
            for job in list(self.jobs.values()):
                if job.cancel_reason is None:  # a job its user cancelled meanwhile ends cancelled, not handed back
                    job.hand_back = True
                job.cancel("runner shut down before the job finished")
            if pending:
                await asyncio.wait(pending, timeout=self.settings.cancel_grace_s + self.settings.kill_grace_s + 10)
