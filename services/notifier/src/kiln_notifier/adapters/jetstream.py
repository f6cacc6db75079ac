"""JetStream side of one WebSocket connection: its ordered consumers, feeding its :class:`Outbox`.

Each subscription is one ordered push consumer per stream (events, logs), started right after the client's
cursor. Ordered consumers are ephemeral, in memory, unacknowledged and detect their own gaps (they recreate
themselves from the last stream sequence seen), which is what a resumable live view needs and costs the
stream nothing once the client is gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from kiln_contracts import streams, subjects
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from ..domain import EVENTS, LOGS, Outbox, Outgoing, SeqGate, event_message, job_key, project_key

log = logging.getLogger(__name__)

STREAM_OF = {EVENTS: streams.EVENTS.name or "KILN_EVENTS", LOGS: streams.LOGS.name or "KILN_LOGS"}
# The server deletes a consumer this long after its subscriber vanished (crash, lost connection).
INACTIVE_THRESHOLD_S = 30.0


def consumer_config(after: int | None, *, live_only: bool = False) -> api.ConsumerConfig:
    """Where an ordered consumer starts: after ``after``, else at the next message (``live_only``) or the first."""
    if after is not None:
        # opt_start_seq is inclusive; the cursor is the last sequence the client already has.
        return api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1,
            inactive_threshold=INACTIVE_THRESHOLD_S,
        )
    policy = api.DeliverPolicy.NEW if live_only else api.DeliverPolicy.ALL
    return api.ConsumerConfig(deliver_policy=policy, inactive_threshold=INACTIVE_THRESHOLD_S)


class Relay:
    """Opens and closes the JetStream subscriptions of one client; every message goes to ``outbox``."""

    def __init__(self, js: JetStreamContext, outbox: Outbox, idle_heartbeat: float = 5.0) -> None:
        self._js = js
        self._outbox = outbox
        self._idle_heartbeat = idle_heartbeat
        self._subs: dict[str, list[JetStreamContext.PushSubscription]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._subs

    def __len__(self) -> int:
        return len(self._subs)

    async def subscribe_job(
        self, job_id: str, after_events: int | None, after_logs: int | None, *, heartbeats: bool = False,
        on_ready: Callable[[str, dict[str, int | None]], None] | None = None,
    ) -> str:
        """Relay one job's events and log batches after the client's cursor; returns the subscription key."""
        key = job_key(job_id)
        plan = [(EVENTS, subjects.job_events(job_id), after_events), (LOGS, subjects.job_logs(job_id), after_logs)]
        await self._open(key, plan, live_only=False, heartbeats=heartbeats, on_ready=on_ready)
        return key

    async def subscribe_project(
        self, project: str, after_events: int | None, *, heartbeats: bool = False,
        on_ready: Callable[[str, dict[str, int | None]], None] | None = None,
    ) -> str:
        """Relay the events (not the logs) of every job of ``project``; without a cursor, only new ones.

        A project's history can be weeks of events of many jobs: the REST API serves that; the socket
        replays only when the client has a cursor, i.e. when it resumes.
        """
        key = project_key(project)
        plan = [(EVENTS, subjects.project_events(project), after_events)]
        await self._open(key, plan, live_only=after_events is None, heartbeats=heartbeats, on_ready=on_ready)
        return key

    async def unsubscribe(self, key: str) -> bool:
        """Stop one subscription; ``False`` when there was none."""
        subs = self._subs.pop(key, None)
        if subs is None:
            return False
        await _unsubscribe_all(subs)
        self._outbox.forget(key)
        return True

    async def close(self) -> None:
        """Stop feeding this client (first thing done when it goes away); its sent cursor stays readable."""
        subs, self._subs = self._subs, {}
        for opened in subs.values():
            await _unsubscribe_all(opened)

    async def _open(
        self, key: str, plan: list[tuple[str, str, int | None]], *, live_only: bool, heartbeats: bool,
        on_ready: Callable[[str, dict[str, int | None]], None] | None,
    ) -> None:
        if key in self._subs:
            raise ValueError(f"already subscribed: {key}")
        cursor = {label: after for label, _, after in plan}
        self._outbox.register(key, cursor)
        if on_ready is not None:
            on_ready(key, cursor)  # queued before any event of the subscription can be
        opened: list[JetStreamContext.PushSubscription] = []
        self._subs[key] = opened
        try:
            for label, subject, after in plan:
                cb = self._callback(key, label, SeqGate(after), heartbeats)
                opened.append(await self._js.subscribe(
                    subject, stream=STREAM_OF[label], cb=cb, ordered_consumer=True,
                    config=consumer_config(after, live_only=live_only), idle_heartbeat=self._idle_heartbeat,
                ))
        except BaseException:
            self._subs.pop(key, None)
            self._outbox.forget(key)
            await _unsubscribe_all(opened)
            raise

    def _callback(self, key: str, label: str, gate: SeqGate, heartbeats: bool) -> Callable[[Msg], Awaitable[None]]:
        outbox = self._outbox

        async def on_msg(msg: Msg) -> None:
            # Runs in nats-py's per-subscription task: it must never wait on the client's socket.
            try:
                seq = msg.metadata.sequence.stream
            except Exception:  # noqa: BLE001 - not a JetStream message: nothing to relay
                log.warning("%s: message without JetStream metadata on %s skipped", key, msg.subject)
                return
            if not gate.accept(seq):
                return
            try:
                text = event_message(key, label, seq, msg.data, heartbeats=heartbeats)
            except ValueError as exc:
                log.warning("%s: invalid event skipped (%s seq %d, %s): %s", key, STREAM_OF[label], seq,
                            msg.subject, str(exc).splitlines()[0])
                return
            if text is not None and outbox.offer(Outgoing(text, key, label, seq)):
                # nats-py hands a whole read of messages to this task without yielding; yielding after each
                # lets the sender drain as we go, so a history replay to a fast client never fills the queue.
                await asyncio.sleep(0)

        return on_msg


async def _unsubscribe_all(subs: list[JetStreamContext.PushSubscription]) -> None:
    for sub in subs:
        try:
            await sub.unsubscribe()
        except Exception as exc:  # noqa: BLE001 - connection closed or draining: the server reaps the consumer
            log.debug("unsubscribe failed: %s", exc)
