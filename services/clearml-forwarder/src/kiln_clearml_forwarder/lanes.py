"""One lane per job: its events and log batches are forwarded in order, retried with backoff, acked when accepted.

Jobs are independent: a job whose ClearML calls are slow or failing holds only its own messages (kept with
in-progress acks) while the other lanes go on; when ClearML is down every lane backs off, JetStream keeps the
rest (up to the consumer's max ack pending) and the forwarder catches up when it returns.  A failed operation is
retried in place, not nak'ed, so that a job's operations keep their order (the task exists before anything is
reported on it; the final status comes after the last scalars).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from dataclasses import dataclass

from nats.aio.msg import Msg

from kiln_contracts import Event
from kiln_contracts.retry import RetryCallState, backoff, failure, retrying, unless
from kiln_observability import job_context

from . import handlers
from .adapters.clearml import PermanentError
from .domain import JobState, Op, apply, coalesce
from .metrics import ForwarderMetrics

log = logging.getLogger("kiln.clearml_forwarder")


@dataclass(frozen=True)
class Timing:
    backoff_initial_s: float = 0.5
    max_backoff_s: float = 30.0
    keepalive_s: float = 15.0  # in-progress acks while holding messages; well under the consumer's ack wait
    linger_s: float = 30.0  # a finished job's task stays open this long for late log batches
    idle_s: float = 600.0  # an unfinished job's task is released after this long without events
    forget_s: float = 3600.0  # a released job's state (seen event ids) is kept this long
    batch: int = 500


class Lane:
    """The forwarding of one job."""

    def __init__(self, state: JobState, deps: handlers.Deps, timing: Timing, saved: dict[str, object] | None,
                 metrics: ForwarderMetrics | None = None) -> None:
        self.state, self.deps, self.timing, self.metrics = state, deps, timing, metrics
        self.saved = saved  # the record the task map holds
        self.items: list[tuple[Msg, Event]] = []
        self.held: list[Msg] = []
        self.ops: list[Op] = []
        self.opened = False
        self.wake = asyncio.Event()
        self.stopping = False
        self.task: asyncio.Task[None] | None = None
        self.failures = 0

    def put(self, msg: Msg, ev: Event) -> None:
        self.items.append((msg, ev))
        self.wake.set()

    async def keepalive(self) -> None:
        for msg in [*self.held, *(m for m, _ in self.items)]:
            with contextlib.suppress(Exception):  # connection trouble: the message may be redelivered, that is all
                await msg.in_progress()

    async def run(self) -> None:
        while not self.stopping:
            if not self.items:
                idle = self.timing.linger_s if self.state.finished else self.timing.idle_s
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), timeout=idle)
                except TimeoutError:
                    if not self.items:
                        await self._release()
                        if not self.items:
                            return
                continue
            batch, self.items = self.items[: self.timing.batch], self.items[self.timing.batch :]
            for msg, ev in batch:
                self.ops += apply(self.state, ev)
                self.held.append(msg)
            self.ops = coalesce(self.ops)
            if not await self._execute():
                return
            for msg in self.held:
                try:
                    await msg.ack()
                except Exception as exc:  # noqa: BLE001 - redelivered later, and then recognised as seen
                    log.warning("job %s: ack failed: %s", self.state.job_id, exc)
            if self.metrics is not None:
                self.metrics.acked.inc(len(self.held))
            self.held.clear()

    async def _execute(self) -> bool:
        """Run the pending operations in order, each retried with backoff until ClearML takes it (a refusal skips
        it); False if asked to stop first (checked before every try; a backoff ends early then)."""
        while self.ops or self._record_changed():
            try:
                async for attempt in retrying(backoff(self.timing.backoff_initial_s, self.timing.max_backoff_s),
                                              retry=unless(lambda exc: isinstance(exc, PermanentError)),
                                              before_sleep=self._failed, sleep=self._sleep):
                    if self.stopping:
                        return False
                    with attempt:
                        await self._step()
                self.failures = 0
            except PermanentError as exc:
                log.error("job %s: ClearML refused %s, skipped: %s", self.state.job_id,
                          type(self.ops[0]).__name__ if self.ops else "the task", exc)
                if not self.ops:
                    raise
                self.ops.pop(0)
                self._count("refused")
                self.opened = False  # look at the task again before the next one: it may have been deleted
        return True

    async def _step(self) -> None:
        """The next operation (the task opened first), or, once none is left, the job's new record in the map."""
        if self.ops and not self.opened:
            if await handlers.open_task(self.state, self.deps, self.keepalive) or self.saved is None:
                await self._save({**(self.saved or _blank(self.state)), "task_id": self.state.task_id})
            self.opened = True
        if self.ops:
            await handlers.run_op(self.state, self.ops[0], self.deps, self.keepalive)
            self.ops.pop(0)
            self._count("ok")
        else:  # every operation done: the map gets the job's new status
            await self._save(self.state.record())

    def _failed(self, state: RetryCallState) -> None:
        """ClearML (or NATS KV) unavailable or slow: counted and said before each backoff."""
        exc, self.failures, wait = failure(state)
        self._count("failed")
        log.warning("job %s: ClearML call failed (%s: %s); retry %d in %.1fs", self.state.job_id,
                    type(exc).__name__, str(exc)[:200], self.failures, wait)

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.operations.labels(result).inc()

    def _record_changed(self) -> bool:
        return self.state.task_id is not None and self.state.record() != self.saved

    async def _save(self, record: dict[str, object]) -> None:
        await self.deps.tasks.put(self.state.job_id, record)
        self.saved = record

    async def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopping and (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, self.timing.keepalive_s))
            await self.keepalive()

    async def _release(self) -> None:
        if self.opened:
            try:
                await handlers.release(self.state, self.deps, self.keepalive)
            except Exception as exc:  # noqa: BLE001 - nothing is lost: only the local handle
                log.warning("job %s: releasing task %s failed: %s", self.state.job_id, self.state.task_id, exc)
            self.opened = False

    async def abandon(self) -> None:
        """At shutdown: hand every message back for immediate redelivery (to this or another forwarder)."""
        for msg in [*self.held, *(m for m, _ in self.items)]:
            with contextlib.suppress(Exception):  # gone with the connection: redelivered after the ack wait
                await msg.nak()
        self.held.clear()
        self.items.clear()


def _blank(state: JobState) -> dict[str, object]:
    return {"task_id": None, "project": state.project, "status": None, "attempt": 0, "started": False}


class Dispatcher:
    """Routes each message to its job's lane, starting lanes on demand and retiring idle ones."""

    def __init__(self, deps: handlers.Deps, timing: Timing, metrics: ForwarderMetrics | None = None) -> None:
        self.deps, self.timing, self.metrics = deps, timing, metrics
        if metrics is not None:
            metrics.active_jobs = lambda: len(self.lanes)
        self.lanes: dict[str, Lane] = {}
        self.retired: dict[str, tuple[float, Lane]] = {}
        self._loading: dict[str, asyncio.Future[Lane]] = {}

    async def submit(self, msg: Msg, ev: Event) -> None:
        lane = self.lanes.get(ev.job_id) or await self._lane(ev)
        lane.put(msg, ev)
        if lane.task is None or lane.task.done():
            with job_context(ev.job_id, None, ev.project):  # the lane's lines name its job (of any attempt)
                lane.task = asyncio.create_task(lane.run(), name=f"clearml-lane-{ev.job_id}")
            lane.task.add_done_callback(functools.partial(self._done, lane))

    async def _lane(self, ev: Event) -> Lane:
        if ev.job_id in self._loading:  # another message of the job is loading its record
            return await self._loading[ev.job_id]
        fut: asyncio.Future[Lane] = asyncio.get_running_loop().create_future()
        self._loading[ev.job_id] = fut
        try:
            old = self.retired.pop(ev.job_id, None)
            if old:
                lane = old[1]
            else:
                rec = await self._get_record(ev.job_id)
                state = JobState.from_record(ev.job_id, ev.project, rec) if rec else JobState(ev.job_id, ev.project)
                lane = Lane(state, self.deps, self.timing, rec, self.metrics)
            self.lanes[ev.job_id] = lane
            fut.set_result(lane)
            return lane
        finally:
            del self._loading[ev.job_id]

    async def _get_record(self, job_id: str) -> dict[str, object] | None:
        """The job's record in the task map, read again with backoff until NATS answers (it may be reconnecting)."""
        def failed(state: RetryCallState) -> None:
            log.warning("reading the task map for %s failed (%s); retrying", job_id, failure(state)[0])

        return await retrying(backoff(self.timing.backoff_initial_s, self.timing.max_backoff_s),
                              before_sleep=failed)(self.deps.tasks.get, job_id)

    def _done(self, lane: Lane, task: asyncio.Task[None]) -> None:
        if lane.task is not task or lane.items or lane.stopping:
            return
        if not task.cancelled() and task.exception():
            log.error("lane of job %s crashed: %r", lane.state.job_id, task.exception())
        self.lanes.pop(lane.state.job_id, None)
        now = time.monotonic()
        self.retired[lane.state.job_id] = (now, lane)
        for job_id, (t, _) in list(self.retired.items()):
            if now - t > self.timing.forget_s:
                del self.retired[job_id]

    async def stop(self, grace_s: float = 5.0) -> None:
        """Let each lane finish the operation it is in (up to ``grace_s``), hand unacked messages back, release."""
        lanes = list(self.lanes.values())
        for lane in lanes:
            lane.stopping = True
            lane.wake.set()
        running = [lane.task for lane in lanes if lane.task and not lane.task.done()]
        if running:
            _, pending = await asyncio.wait(running, timeout=grace_s)
            for t in pending:
                t.cancel()
        for lane in lanes:
            await lane.abandon()
            try:
                await asyncio.wait_for(lane._release(), timeout=grace_s)
            except TimeoutError:
                log.warning("job %s: release of its task timed out at shutdown", lane.state.job_id)
