"""Runs one job attempt: dataset, spawn, logs, heartbeats, cancel, timeout, outcome."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

from nats.js import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from kiln_contracts import (
    ExitClass, Heartbeat, JobFinished, JobStatus, JobStatusChanged, StartJob, utcnow,
)

from kiln_contracts import data_roots as paths
from kiln_contracts.natsauth.client import TLS_ENV
from kiln_contracts.retry import backoff, retry_if_result, retrying
from kiln_contracts.service import publish_attempt

from .adapters import process
from .adapters.checkpoints import CheckpointError, CheckpointFetcher, read_record, resume_fields
from .adapters.datasets import DatasetCache, DatasetError, Resolved
from .adapters.events import JobEvents
from .adapters.spools import RUNNER_SPOOL, SpoolDrainer
from .adapters.sandbox import TrainerUsers
from .adapters.trainer_creds import CREDS_ENV, INBOX_ENV, Issued, TrainerCreds
from .domain import Outcome, classify_exit, retry_after
from .metrics import RunnerMetrics
from .settings import Settings
from .versions import versions

log = logging.getLogger("kiln.runner")
_BACKGROUND: set[asyncio.Task[None]] = set()  # registry deletes retried until the bus takes them
_SCRUB_PREFIXES = ("KILN_RUNNER_", "KILN_API_", "KILN_WRITER_", "KILN_NOTIFIER_", "AWS_")
REQUEUE_ATTEMPTS = 5


class RunningJob:
    def __init__(self, cmd: StartJob, settings: Settings, js: JetStreamContext, slot: int,
                 registry: KeyValue | None = None, datasets: DatasetCache | None = None,
                 checkpoints: CheckpointFetcher | None = None, spools: SpoolDrainer | None = None,
                 creds: TrainerCreds | None = None, metrics: RunnerMetrics | None = None,
                 users: TrainerUsers | None = None) -> None:
        self.cmd, self.settings, self.js, self.slot = cmd, settings, js, slot
        self.metrics = metrics
        self.last_beat = time.monotonic()  # the attempt's last heartbeat JetStream took (its start before any)
        self.last_claim = time.monotonic()  # the attempt's claim (running-registry entry) last renewed
        self.creds = creds  # None: the trainer connects without credentials (no trainer key configured)
        self.users = users  # None: the trainer runs as this runner's user
        self.issued: Issued | None = None  # this attempt's trainer creds while its trainer may run
        self.registry = registry
        self.datasets = datasets or DatasetCache(settings.work_dir / "datasets", data_roots=lambda: settings.roots)
        self.checkpoints = checkpoints
        self.resume_path: Path | None = None  # the fetched checkpoint this attempt resumes from
        self.model_path: str | None = None  # the job's model file, checked against the data roots (None: shipped)
        self.spawn_ms: float | None = None
        self._reg_rev = 0
        self._reg_lock = asyncio.Lock()
        self.fenced = False  # the reaper declared this attempt lost: report nothing terminal
        self.dir = (settings.work_dir / "jobs" / f"{cmd.job_id}-{cmd.attempt}").resolve()
        self.spools = spools
        self.events = JobEvents(js, cmd, spool=spools.attach(self.dir / RUNNER_SPOOL) if spools else None,
                                spooled=spools.wake if spools else None)
        self.proc: asyncio.subprocess.Process | None = None
        self.cancel_reason: str | None = None
        self.hand_back = False  # runner shutdown: requeue as the next attempt instead of ending the job
        self.no_retry = False  # a failure that no retry can fix (its checkpoint cannot be used)
        self._cancel_event = asyncio.Event()

    # --- control from outside -------------------------------------------------------------------------
    def cancel(self, reason: str) -> None:
        """Ask the trainer to stop at its next batch boundary (it checkpoints); the group is killed after grace."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
            with contextlib.suppress(OSError):
                (self.dir / "cancel").write_text(reason)
            self._cancel_event.set()

    # --- the attempt --------------------------------------------------------------------------------
    async def run(self) -> Outcome:
        host = socket.gethostname()
        await self.events.emit(JobStatusChanged(status=JobStatus.starting, runner=self.settings.runner_id, host=host,
                                                reason=f"claimed by {self.settings.runner_id}", spec=self.cmd.spec))
        try:
            outcome = await self._run(host)
        except (DatasetError, paths.PathRefused) as exc:
            outcome = Outcome(JobStatus.failed, ExitClass.user_error, str(exc))
        except CheckpointError as exc:  # the same checkpoint would fail the same way again: not retried
            self.no_retry = True
            outcome = Outcome(JobStatus.failed, ExitClass.infrastructure, str(exc))
        except Exception as exc:  # noqa: BLE001 - a runner bug or a broken host must still end the job
            log.exception("job %s failed in the runner", self.cmd.job_id)
            outcome = Outcome(JobStatus.failed, ExitClass.infrastructure, f"runner error: {exc}")
        await self.events.flush_logs()
        if not self.fenced and self.registry is not None and self._reg_rev:
            # A runner that was frozen may learn only now that the reaper took the attempt over: ask before the end.
            self.fenced = await self._own_revision() is None
        if self.fenced:
            log.warning("job %s attempt %s was taken over by the reaper; not reporting its end", self.cmd.job_id,
                        self.cmd.attempt)
            self._count("fenced", outcome)
            return outcome
        if self.hand_back and outcome.status == JobStatus.cancelled:
            await self._requeue_or_leave(f"runner {self.settings.runner_id} shut down; handed back")
            self._count("handed_back", outcome)
            return outcome
        retry = self.cancel_reason is None and not self.no_retry
        delay = retry_after(self.cmd.spec, self.cmd.attempt, outcome) if retry else None
        if delay is not None:
            await self._requeue_or_leave(f"attempt {self.cmd.attempt} failed ({outcome.exit_class.value}: "
                                         f"{outcome.reason[:300]}); retrying in {delay:.0f}s", delay_s=delay)
            self._count(outcome.status.value, outcome, retried=True)
            return outcome
        await self._unregister()
        code = self.proc.returncode if self.proc else None
        await self.events.emit(JobFinished(status=outcome.status, reason=outcome.reason, exit_code=code,
                                           exit_class=outcome.exit_class, last_logs=list(self.events.tail)))
        log.info("job %s attempt %s: %s %s", self.cmd.job_id, self.cmd.attempt, outcome.status.value, outcome.reason)
        self._count(outcome.status.value, outcome)
        return outcome

    def _count(self, what: str, outcome: Outcome, retried: bool = False) -> None:
        if self.metrics is not None:
            self.metrics.ended(what, outcome.exit_class.value)
            if retried:
                self.metrics.retried("failed")

    def close(self) -> None:
        """The attempt is over (whatever the path): its runner spool is forgotten once published."""
        if self.spools is not None:
            self.spools.detach(self.dir / RUNNER_SPOOL)

    def _env(self, data: Resolved) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB_PREFIXES)}
        env.pop("PYTEST_CURRENT_TEST", None)  # Ultralytics changes behaviour "under pytest"
        for key in (CREDS_ENV, INBOX_ENV):  # never inherited: minted per attempt, or given in TRAINER_ENV
            env.pop(key, None)
        env.update(
            KILN_JOB_ID=self.cmd.job_id, KILN_PROJECT=self.cmd.spec.project, KILN_ATTEMPT=str(self.cmd.attempt),
            KILN_NATS_URL=self.settings.nats_url, KILN_JOB_DIR=str(self.dir), KILN_JOB_SPEC=str(self.dir / "job.json"),
            KILN_DATASET=str(data.data), KILN_SPOOL_DIR=str(self.dir / "spool"), PYTHONUNBUFFERED="1",
        )
        for key in TLS_ENV:  # the runner's own NATS TLS files, never inherited ones
            env.pop(key, None)
        env.update(self.settings.nats_tls.env())
        if self.settings.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.settings.gpus[self.slot % len(self.settings.gpus)]
        else:
            env.setdefault("CUDA_VISIBLE_DEVICES", "")
        if self.resume_path is not None:
            env["KILN_RESUME"] = str(self.resume_path)
        s = self.settings
        for key, value in (("KILN_ARTIFACT_DIR", s.artifact_dir), ("KILN_ARTIFACT_S3_URI", s.artifact_s3_uri),
                           ("KILN_ARTIFACT_S3_ENDPOINT", s.artifact_s3_endpoint)):
            if value:
                env[key] = str(value)
        env.update(s.trainer_env)
        # After TRAINER_ENV: the trainer checks the roots this runner checked. Names are fixed; a job gives values only.
        env[paths.ROOTS_ENV] = json.dumps(self._trainer_roots(data))
        env.pop("KILN_MODEL", None)
        if self.model_path is not None:
            env["KILN_MODEL"] = self.model_path
        if self.issued is not None:  # after TRAINER_ENV: the attempt's own creds win
            env.update(self.issued.env())
        if s.ultralytics_autoload:
            from kiln_sdk.integrations.ultralytics_autoload import pythonpath

            env["PYTHONPATH"] = pythonpath(env.get("PYTHONPATH"))
        return env

    def _trainer_roots(self, data: Resolved) -> list[str]:
        """The runner's roots, and what it fetched for this attempt: an S3 snapshot, the resume checkpoint."""
        s3 = self.cmd.spec.dataset.startswith("s3://")
        extra = [str(data.data if data.data.is_dir() else data.data.parent)] if s3 else []
        if self.resume_path is not None:
            extra.append(str(self.resume_path.parent))
        return list(paths.real_roots([*self.settings.roots, *extra]))

    async def _run(self, host: str) -> Outcome:
        self.dir.mkdir(parents=True, exist_ok=True)
        beat = asyncio.create_task(self._heartbeat_loop())  # beats while the dataset downloads, too
        watch = asyncio.create_task(self._claim_watch())
        try:
            # Before anything is read or spawned: a job names only files under the data roots (paths.py).
            self.model_path = paths.model_file(self.cmd.spec.model, self.settings.roots, os.getcwd())
            data = await self.datasets.resolve(self.cmd.spec.dataset, self.cmd.spec.task.value,
                                               lambda line: self.events.line(line, "runner"))
            pinned = self.cmd.spec.dataset_snapshot
            if pinned and data.snapshot != pinned:
                raise DatasetError(f"dataset {self.cmd.spec.dataset} changed: it is now snapshot {data.snapshot}, "
                                   f"this job is pinned to {pinned} (its original's); re-run with data=latest to "
                                   "train on the current data")
            await self._fetch_checkpoint()
            return await self._train(host, data)
        finally:
            beat.cancel()
            watch.cancel()
            self._drop_creds()  # whatever way the attempt ended (the trainer's exit drops them earlier)

    async def _train(self, host: str, data: Resolved) -> Outcome:
        if self.cancel_reason is not None:  # cancelled while its dataset was resolved: never spawn it
            return Outcome(JobStatus.cancelled, ExitClass.cancelled, self.cancel_reason)
        if self.fenced:  # the claim lapsed meanwhile: the attempt is someone else's now (reported by nobody here)
            return Outcome(JobStatus.failed, ExitClass.infrastructure, "claim lapsed before the trainer started")
        (self.dir / "job.json").write_text(self.cmd.model_dump_json(indent=2))
        if self.creds is not None:
            self.issued = self.creds.issue(self.cmd, self.dir)
        env = self._env(data)
        uid = None
        if self.users is not None:  # its own uid: the folder (and its creds) become that uid's, nothing else does
            uid = self.users.uid(self.slot)
            self.users.hand_over(self.dir, self.slot, give=(self.issued.path,) if self.issued else (),
                                 keep=(self.dir / RUNNER_SPOOL,))
            env.update(self.users.env(self.dir))
        t0 = time.perf_counter()
        try:
            self.proc = await process.spawn(self.settings.trainer_cmd, env, str(self.dir), uid=uid)
        except OSError as exc:
            return Outcome(JobStatus.failed, ExitClass.infrastructure, f"cannot start trainer: {exc}")
        self.spawn_ms = (time.perf_counter() - t0) * 1000
        if self.metrics is not None:
            self.metrics.spawn.observe(self.spawn_ms / 1000)
        await self._register()
        record = {"pid": self.proc.pid, "dataset_path": str(data.data), "dataset_snapshot": data.snapshot,
                  "dataset_files": data.files, "dataset_cached": data.cached, "slot": self.slot,
                  "spawn_ms": round(self.spawn_ms, 2), "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES", ""),
                  "seed": self.cmd.spec.train.seed, "host": host, "runner": self.settings.runner_id,
                  "resume_from": self.cmd.resume_from, "resume_epoch": self.cmd.resume_epoch,
                  **{f"version_{k}": v for k, v in versions().items()}}
        await self.events.emit(JobStatusChanged(status=JobStatus.running, runner=self.settings.runner_id, host=host,
                                                reason=f"trainer pid {self.proc.pid} on {host}", details=record))
        assert self.proc.stdout and self.proc.stderr
        pumps = [asyncio.create_task(process.pump(self.proc.stdout, lambda t: self.events.line(t, "stdout"))),
                 asyncio.create_task(process.pump(self.proc.stderr, lambda t: self.events.line(t, "stderr")))]
        side = [asyncio.create_task(self._flush_loop()), asyncio.create_task(self._cancel_watch())]
        timed_out = False
        try:
            await asyncio.wait_for(self.proc.wait(), self.cmd.spec.timeout_s)
        except asyncio.TimeoutError:
            timed_out = True
            await process.stop_group(self.proc, self.settings.kill_grace_s)
        finally:
            process.signal_group(self.proc.pid, 9)  # nothing of the group outlives the attempt
            self._drop_creds()  # its spool is replayed with the runner's own identity
            for t in side:
                t.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        await self._replay_spool()
        return classify_exit(self.proc.returncode or 0, list(self.events.tail), cancelled=self.cancel_reason is not None,
                             timed_out=timed_out, cancel_reason=self.cancel_reason or "")

    def _drop_creds(self) -> None:
        issued, self.issued = self.issued, None
        if issued is not None:
            issued.remove()

    async def _fetch_checkpoint(self) -> None:
        """Bring the earlier attempt's stored checkpoint here and check its SHA-256 (resumed attempts only)."""
        uri = self.cmd.resume_from
        if not uri:
            return
        if self.checkpoints is None:
            raise CheckpointError(f"resume checkpoint {uri}: this runner cannot fetch checkpoints")
        self.events.line(f"kiln: fetching the checkpoint of epoch {self.cmd.resume_epoch or '?'} from {uri}", "runner")
        self.resume_path = await self.checkpoints.fetch(uri, self.cmd.resume_sha256, self.dir / "resume",
                                                        self.cmd.spec.project, self.cmd.job_id)
        digest = self.cmd.resume_sha256 or "not recorded"
        self.events.line(f"kiln: resuming from {self.resume_path.name} (SHA-256 {digest})", "runner")

    async def _requeue_or_leave(self, why: str, delay_s: float = 0.0) -> None:
        """Queue the next attempt, then leave the registry; if NATS does not take the command, stay in the
        registry: the reaper then sees this attempt go silent and retries it (or ends it) itself."""
        try:  # 5 tries, 0.5 s doubling to 4 s between them: about 7.5 s, well within the reaper's lost_after_s
            await retrying(backoff(0.5, 4.0), attempts=REQUEUE_ATTEMPTS)(self._requeue, why, delay_s)
        except Exception as exc:  # noqa: BLE001 - the bus is away
            log.error("job %s: next attempt not queued (%s); left to the reaper", self.cmd.job_id, exc)
            return
        await self._unregister()

    async def _requeue(self, why: str, delay_s: float = 0.0) -> None:
        """Publish the next attempt (resuming from the last stored checkpoint) for another runner; no terminal event.

        ``delay_s``: the next attempt waits that long (a runner that gets it earlier puts it back until then).
        """
        resume = resume_fields(self._checkpoint()) or {
            k: getattr(self.cmd, k) for k in ("resume_from", "resume_sha256", "resume_epoch")}
        now = utcnow()
        not_before = now + timedelta(seconds=delay_s) if delay_s > 0 else None
        nxt = self.cmd.model_copy(update={"attempt": self.cmd.attempt + 1, "issued_at": now,
                                          "not_before": not_before, **resume})
        await publish_attempt(self.js, nxt, source="runner", reason=f"{why} as attempt {nxt.attempt}")
        log.info("job %s handed back as attempt %s", nxt.job_id, nxt.attempt)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.log_flush_s)
            await self.events.flush_logs()

    async def _heartbeat_loop(self) -> None:
        while True:
            if await self.events.emit(Heartbeat(runner=self.settings.runner_id,
                                                pid=self.proc.pid if self.proc else None)):
                self.last_beat = time.monotonic()
            await self._register()
            if self.fenced:
                log.error("job %s attempt %s declared lost by the reaper; stopping its trainer", self.cmd.job_id,
                          self.cmd.attempt)
                if self.proc is not None:
                    await process.stop_group(self.proc, self.settings.cancel_grace_s)
                return
            await asyncio.sleep(self.settings.heartbeat_s)

    async def _claim_watch(self) -> None:
        """Cut off from the bus longer than a reaper waits, the attempt is another runner's to retry (or is marked
        lost): stop the trainer then, so it neither keeps a GPU busy nor writes beside the retry.  A loop of its own:
        the heartbeat's calls may each wait for their timeout while the bus is away."""
        if self.registry is None:
            return
        while not self.fenced:
            await asyncio.sleep(min(1.0, self.settings.heartbeat_s))
            silent = time.monotonic() - self.last_claim
            if silent > self.settings.lost_after_s:
                self.fenced = True
                log.error("job %s attempt %s: claim not renewed for %.0fs (lost after %.0fs): this runner is cut off "
                          "from the bus; stopping its trainer (a reaper retries the attempt or marks it lost)",
                          self.cmd.job_id, self.cmd.attempt, silent, self.settings.lost_after_s)
                if self.proc is not None:
                    await process.stop_group(self.proc, self.settings.cancel_grace_s)

    @property
    def registry_key(self) -> str:
        return f"{self.cmd.job_id}.{self.cmd.attempt}"

    def _checkpoint(self) -> dict | None:
        """The stored resumable checkpoint the trainer named (``resume.json``), if any."""
        return read_record(self.dir)

    async def register(self) -> bool:
        """Enter the running registry; False when the attempt is already held there (a duplicate delivery)."""
        if self.registry is None:
            return True
        try:  # other errors propagate: the start command is then not acked and comes back later
            self._reg_rev = await self.registry.create(self.registry_key, json.dumps(self._record()).encode())
            self.last_claim = time.monotonic()
            return True
        except KeyWrongLastSequenceError:
            log.info("job %s attempt %s is already running elsewhere; dropping duplicate start", self.cmd.job_id,
                     self.cmd.attempt)
            return False

    async def unregister(self) -> None:
        await self._unregister()

    async def _register(self) -> None:
        """Create/refresh this attempt's entry in the running registry (compare-and-set: detects fencing)."""
        if self.registry is None:
            return
        async with self._reg_lock:
            await self._put(self._record())

    def _record(self) -> dict:
        return {"runner": self.settings.runner_id, "cmd": self.cmd.model_dump(mode="json"),
                "pid": self.proc.pid if self.proc else None, "checkpoint": self._checkpoint()}

    async def _put(self, rec: dict) -> None:
        assert self.registry is not None
        try:
            if self._reg_rev == 0:
                self._reg_rev = await self.registry.create(self.registry_key, json.dumps(rec).encode())
            else:
                self._reg_rev = await self.registry.update(self.registry_key, json.dumps(rec).encode(),
                                                           last=self._reg_rev)
            self.last_claim = time.monotonic()
        except KeyWrongLastSequenceError:
            # Either the reaper took the attempt over (it deletes the entry), or an update sent while the client
            # was reconnecting was applied late and our revision is stale: only the first is fencing.
            if (rev := await self._own_revision()) is None:
                self.fenced = True
            else:
                self._reg_rev = rev
        except Exception as exc:  # noqa: BLE001 - bus trouble: try again at the next beat
            log.warning("registry update of %s failed: %s", self.registry_key, exc)

    async def _own_revision(self) -> int | None:
        """The revision of this attempt's entry when it is still ours (same runner), else None (taken over)."""
        assert self.registry is not None
        try:
            entry = await self.registry.get(self.registry_key)
            held = json.loads(entry.value or b"{}")
        except (KeyNotFoundError, KeyDeletedError):
            return None
        except Exception as exc:  # noqa: BLE001 - bus trouble: not fenced on a guess; the next beat looks again
            log.warning("registry read of %s failed: %s", self.registry_key, exc)
            return self._reg_rev
        return entry.revision if held.get("runner") == self.settings.runner_id else None

    async def _unregister(self) -> None:
        """Leave the running registry; while NATS is away, keep trying in the background (an entry left behind
        would make the reaper declare a finished attempt lost)."""
        if self.registry is None or not self._reg_rev or self.fenced:
            return
        if not await self._delete_entry():
            task = asyncio.create_task(self._delete_entry_until_done())
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)

    async def _delete_entry(self) -> bool:
        assert self.registry is not None
        try:
            await self.registry.delete(self.registry_key, last=self._reg_rev)
            return True
        except KeyWrongLastSequenceError:
            if (rev := await self._own_revision()) is None:
                return True  # the reaper took it over meanwhile: not ours to delete any more
            self._reg_rev = rev  # a late update made our revision stale: delete at the current one
            return False
        except Exception as exc:  # noqa: BLE001 - bus trouble: retried
            log.warning("registry delete of %s failed: %s", self.registry_key, exc)
            return False

    async def _delete_entry_until_done(self) -> None:
        # _delete_entry logs each failure and answers False; retried every 1 s doubling to 10 s until it is done.
        await retrying(backoff(1.0, 10.0), retry=retry_if_result(lambda done: not done))(self._delete_entry)
        log.info("registry entry %s deleted after the bus came back", self.registry_key)

    async def _cancel_watch(self) -> None:
        await self._cancel_event.wait()
        assert self.proc is not None
        try:
            await asyncio.wait_for(asyncio.shield(self.proc.wait()), self.settings.cancel_grace_s)
        except asyncio.TimeoutError:
            await process.stop_group(self.proc, self.settings.kill_grace_s)

    async def _replay_spool(self) -> None:
        """Publish what the exited trainer left in its spool before the attempt's end is reported.

        The runner's :class:`SpoolDrainer` takes the spool over: one pass now (NATS is usually there), and, while
        NATS is away, again and again until it is back, however long that takes (runner restarts included).
        """
        if self.spools is None:
            return
        self.spools.adopt_trainer_spool(self.dir, (self.cmd.spec.project, self.cmd.job_id))
        await self.spools.drain_once()
