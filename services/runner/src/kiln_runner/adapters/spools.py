"""Events that could not reach NATS yet, on disk until it takes them: however long it is away, runner restarts too.

Two kinds of spool live in a job attempt's folder: the trainer's (``spool/``, written by the Kiln SDK while NATS
was unreachable, left behind when it exited or was killed) and the runner's own (``runner-spool/``: status, logs,
heartbeats and the end of the attempt that the runner could not publish). One :class:`SpoolDrainer` per runner
publishes every pending spool whenever the bus is up, in order, each line with its event id as ``Nats-Msg-Id`` (so a
line stored before its ack got lost is stored once), and deletes a spool once JetStream acknowledged all of it.
At start it picks up what an earlier runner process left in the work folder.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from kiln_contracts import StartJob
from kiln_sdk.spool import Owner, Spool, drain_spool, spool_folders
from nats.js import JetStreamContext

log = logging.getLogger("kiln.runner")
RUNNER_SPOOL = "runner-spool"
TRAINER_SPOOL = "spool"


class SpoolDrainer:
    def __init__(self, js: JetStreamContext, jobs_dir: Path, interval_s: float = 2.0) -> None:
        self.js, self.jobs_dir, self.interval_s = js, jobs_dir, interval_s
        self._spools: dict[Path, Spool] = {}
        self._owners: dict[Path, Owner] = {}  # a trainer spool's job: only its events leave through it
        self._live: set[Path] = set()  # spools a running attempt appends to: kept even when empty
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # one drain at a time: two would commit each other's offsets

    def spool(self, folder: Path) -> Spool:
        """The one :class:`Spool` of ``folder`` in this process (the runner's events append to it, this drains it)."""
        folder = folder.resolve()
        if folder not in self._spools:
            self._spools[folder] = Spool(folder)
        return self._spools[folder]

    def attach(self, folder: Path) -> Spool:
        """The spool a running attempt writes its own events to (kept until :meth:`detach`)."""
        self._live.add(folder.resolve())
        return self.spool(folder)

    def detach(self, folder: Path) -> None:
        """The attempt has ended: once its spool is published it is forgotten."""
        self._live.discard(folder.resolve())

    def adopt_trainer_spool(self, job_dir: Path, owner: Owner | None = None) -> None:
        """A trainer has exited: what it left in its spool (and its DDP workers') is ours to publish, but only its
        own job's events: this runner's identity reaches further than the trainer's (docs/nats-auth.md).  The job
        is the attempt's (``owner``), or after a restart the one in the ``job.json`` the runner wrote before the
        spawn, which must name the folder's job and attempt; without one nothing of the spool leaves."""
        owner = owner or job_owner(job_dir)
        for folder in spool_folders(job_dir / TRAINER_SPOOL):
            if owner is None:
                log.warning("spool %s: no readable job.json beside it, so no job it may speak for: kept, not "
                            "published", folder)
                continue
            sp = self.spool(folder)
            self._owners[folder.resolve()] = owner
            sp.reject_torn_tail()  # its writer is gone: a half-written last line can never be completed
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    @property
    def pending(self) -> int:
        return sum(1 for sp in self._spools.values() if sp.pending)

    def scan(self) -> None:
        """Adopt the spools an earlier runner process left behind (its trainers died with it)."""
        if not self.jobs_dir.is_dir():
            return
        for job_dir in self.jobs_dir.iterdir():
            if (job_dir / TRAINER_SPOOL).is_dir():
                self.adopt_trainer_spool(job_dir)
            if (job_dir / RUNNER_SPOOL / "events.jsonl").exists():
                self.spool(job_dir / RUNNER_SPOOL)

    async def drain_once(self, timeout: float = 5.0) -> bool:
        """Publish what is pending; True when nothing is left."""
        async with self._lock:
            for folder, sp in sorted(self._spools.items(), key=_order):
                if not sp.pending:
                    if folder not in self._live:
                        del self._spools[folder]  # published, and nobody writes to it any more
                        self._owners.pop(folder, None)
                    continue
                try:
                    sent, failed = await drain_spool(self.js, sp, timeout=timeout, owner=self._owners.get(folder))
                except Exception as exc:  # noqa: BLE001 - NATS away: the next pass tries again
                    log.debug("spool %s not drained yet: %s", folder, exc)
                    return False
                if sent:
                    log.info("published %d spooled event(s) from %s", sent, folder)
                if failed:
                    return False
            return True

    async def run(self, stop: asyncio.Event) -> None:
        self.scan()
        while not stop.is_set():
            await self.drain_once()
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            except asyncio.TimeoutError:
                pass
        await self.drain_once()  # a last pass on the way out; what is left waits for the next runner process


def job_owner(job_dir: Path) -> Owner | None:
    """``(project, job_id)`` of an attempt's folder, from the start command the runner wrote there (``job.json``)."""
    try:
        cmd = StartJob.model_validate_json((job_dir / "job.json").read_bytes())
    except (OSError, ValueError):
        return None
    if job_dir.name != f"{cmd.job_id}-{cmd.attempt}":  # the runner names the folder: a rewritten job.json shows
        return None
    return cmd.spec.project, cmd.job_id


def _order(item: tuple[Path, Spool]) -> tuple[str, int]:
    """A job's trainer events before the runner's (its end among them); jobs in folder order."""
    folder = item[0]
    if folder.name == RUNNER_SPOOL:
        return str(folder.parent), 1
    job_dir = folder.parent if folder.name == TRAINER_SPOOL else folder.parent.parent  # spool/rank<N>-<pid>
    return str(job_dir), 0
