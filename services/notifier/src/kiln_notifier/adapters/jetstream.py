"""JetStream side of the notifier: one shared live feed per subject per process, and per-client replays.

Live path. Every subject a client watches (a job's events, a job's logs, a project's events) has one
:class:`Feed` per notifier process: one JetStream ordered consumer, started at the end of the stream when the
first client subscribes and stopped when the last one leaves. Each message is rendered once and handed to
every client that has caught up; 1,000 clients of one job cost one consumer per stream, not 2,000.

Replay. A client that subscribes joins the feed first (buffering what it delivers), then replays its history
with its own ordered consumer from its cursor. Once the replay has delivered everything up to where the feed
started covering it for that client (``live_from``; or the replay reports nothing pending), the replay
consumer is dropped, the buffer is flushed and the client is fed by the feed from then on. Every message
goes through the client's :class:`SeqGate`, so the overlap between replay, buffer and feed is delivered once.
A client with nothing to replay (no history, or a cursor at the end) skips the replay consumer entirely.

Ordered consumers are ephemeral, in memory, unacknowledged and detect their own gaps (they recreate
themselves from the last stream sequence seen), which is what a resumable live view needs and costs the
stream nothing once the clients are gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from kiln_contracts import streams, subjects
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from ..domain import EVENTS, LOGS, Outbox, Outgoing, SeqGate, event_message, job_key, project_key

log = logging.getLogger(__name__)

STREAM_OF = {EVENTS: streams.EVENTS.name or "KILN_EVENTS", LOGS: streams.LOGS.name or "KILN_LOGS"}
# The server deletes a consumer this long after its subscriber vanished (crash, lost connection).
INACTIVE_THRESHOLD_S = 30.0

OnReady = Callable[[str, dict[str, int | None]], None]


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


class Rendered:
    """One JetStream message of one subscription key, rendered at most once per heartbeat setting."""

    __slots__ = ("key", "label", "seq", "data", "stored_at", "subject", "_texts")

    def __init__(self, key: str, label: str, seq: int, data: bytes, stored_at: float | None = None,
                 subject: str | None = None) -> None:
        self.key, self.label, self.seq, self.data, self.stored_at = key, label, seq, data, stored_at
        self.subject = subject
        self._texts: dict[bool, str | None] = {}

    def text(self, heartbeats: bool) -> str | None:
        """The WebSocket text, ``None`` when filtered out or invalid (logged once)."""
        try:
            return self._texts[heartbeats]
        except KeyError:
            pass
        try:
            text = event_message(self.key, self.label, self.seq, self.data, heartbeats=heartbeats,
                                 subject=self.subject)
        except ValueError as exc:
            if not self._texts:  # log an invalid message once, not once per client
                log.warning("%s: invalid event skipped (%s seq %d): %s", self.key, STREAM_OF[self.label], self.seq,
                            str(exc).splitlines()[0])
            text = None
        self._texts[heartbeats] = text
        return text


def _stored_at(msg: Msg) -> float | None:
    """When JetStream stored ``msg`` (Unix time), from its metadata (already parsed for its sequence)."""
    try:
        return msg.metadata.timestamp.timestamp()
    except Exception:  # noqa: BLE001 - not a JetStream message
        return None


def _stream_seq(key: str, msg: Msg) -> int | None:
    try:
        return msg.metadata.sequence.stream
    except Exception:  # noqa: BLE001 - not a JetStream message: nothing to relay
        log.warning("%s: message without JetStream metadata on %s skipped", key, msg.subject)
        return None


class Listener:
    """One client's view of one stream of one subscription: replaying (buffering the feed) or live."""

    def __init__(self, outbox: Outbox, key: str, label: str, after: int | None, heartbeats: bool) -> None:
        self.outbox, self.key, self.label, self.heartbeats = outbox, key, label, heartbeats
        self.gate = SeqGate(after)
        self.live_from = 1  # first sequence the feed delivers to this listener; set when it joins
        self.buffer: list[Rendered] | None = []  # feed messages held while replaying; None once live
        self.replay: JetStreamContext.PushSubscription | None = None

    @property
    def is_live(self) -> bool:
        return self.buffer is None

    def deliver(self, item: Rendered, origin: str = "live") -> bool:
        """Queue ``item`` for the client unless already delivered or filtered out; never blocks."""
        if not self.gate.accept(item.seq):
            return False
        text = item.text(self.heartbeats)
        return text is not None and self.outbox.offer(
            Outgoing(text, self.key, self.label, item.seq, origin, item.stored_at))

    def from_feed(self, item: Rendered) -> None:
        if self.buffer is None:
            self.deliver(item)
            return
        self.buffer.append(item)
        if len(self.buffer) > self.outbox.capacity:  # a replay that cannot keep up: cut off, it resumes
            self.outbox.overflow()

    def caught_up(self, pending: int | None = None) -> bool:
        """Whether the replay has delivered everything before ``live_from`` (the feed covers the rest)."""
        return pending == 0 or self.gate.last >= self.live_from - 1

    def go_live(self) -> None:
        buffered, self.buffer = self.buffer or [], None
        for item in buffered:
            self.deliver(item)


class Feed:
    """One shared ordered consumer on one subject; every message fans out to every listener."""

    def __init__(self, key: str, label: str, subject: str, high: int) -> None:
        self.key, self.label, self.subject = key, label, subject
        self.high = high  # last stream sequence fanned out (or the stream's end when the feed started)
        self.listeners: dict[Listener, None] = {}  # insertion ordered
        self.sub: JetStreamContext.PushSubscription | None = None

    def add(self, listener: Listener) -> None:
        # Messages after ``high`` that nats-py already holds but has not handed over yet reach this listener too.
        listener.live_from = self.high + 1
        self.listeners[listener] = None

    async def on_msg(self, msg: Msg) -> None:
        seq = _stream_seq(self.key, msg)
        # A recreated ordered consumer may redeliver (from the start of the subject if it had delivered
        # nothing yet): the feed passes on each sequence once.
        if seq is None or seq <= self.high:
            return
        self.high = seq
        item = Rendered(self.key, self.label, seq, msg.data, _stored_at(msg), msg.subject)
        for listener in list(self.listeners):
            listener.from_feed(item)
        await asyncio.sleep(0)  # let the senders drain between messages of one read


class Fanout:
    """The process's shared feeds, keyed by stream and subject; created on first use, stopped when unused."""

    def __init__(self, js: JetStreamContext, idle_heartbeat: float = 5.0) -> None:
        self.js = js
        self.idle_heartbeat = idle_heartbeat
        self._feeds: dict[tuple[str, str], Feed] = {}
        self._creating: dict[tuple[str, str], asyncio.Future[Feed]] = {}

    def __len__(self) -> int:
        return len(self._feeds)

    async def join(self, key: str, label: str, subject: str, listener: Listener) -> Feed:
        """Attach ``listener`` to the feed of ``subject`` (starting it if needed)."""
        k = (label, subject)
        while (feed := self._feeds.get(k)) is None:
            creating = self._creating.get(k)
            if creating is None:
                creating = asyncio.ensure_future(self._create(k, key))
                self._creating[k] = creating
                creating.add_done_callback(lambda _f, k=k: self._creating.pop(k, None))
            try:
                await asyncio.shield(creating)
            except asyncio.CancelledError:
                creating.add_done_callback(lambda _f, k=k: self._reap_soon(k))
                raise
        feed.add(listener)
        return feed

    async def leave(self, feed: Feed, listener: Listener) -> None:
        feed.listeners.pop(listener, None)
        await self._reap(feed)

    def _reap_soon(self, k: tuple[str, str]) -> None:
        feed = self._feeds.get(k)
        if feed is not None and not feed.listeners:
            asyncio.ensure_future(self._reap(feed))

    async def _reap(self, feed: Feed) -> None:
        k = (feed.label, feed.subject)
        if feed.listeners or self._feeds.get(k) is not feed:
            return
        del self._feeds[k]
        if feed.sub is not None:
            await _unsubscribe_all([feed.sub], self.js)

    async def _create(self, k: tuple[str, str], key: str) -> Feed:
        label, subject = k
        stream = STREAM_OF[label]
        info = await self.js.stream_info(stream)
        high = info.state.last_seq
        feed = Feed(key, label, subject, high)
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=high + 1,
            inactive_threshold=INACTIVE_THRESHOLD_S,
        )
        feed.sub = await self.js.subscribe(
            subject, stream=stream, cb=feed.on_msg, ordered_consumer=True, config=config,
            idle_heartbeat=self.idle_heartbeat,
        )
        self._feeds[k] = feed
        return feed

    async def last_seq(self, label: str, subject: str) -> int | None:
        """The stream sequence of the last message on ``subject`` (no wildcards), ``None`` when there is none."""
        try:
            return (await self.js.get_last_msg(STREAM_OF[label], subject)).seq
        except NotFoundError:
            return None


class _Opened:
    """What one subscription holds: per stream, its listener and the feed it joined."""

    def __init__(self) -> None:
        self.parts: list[tuple[Feed, Listener]] = []


class Relay:
    """Opens and closes the subscriptions of one client; every message goes to ``outbox``."""

    def __init__(self, fanout: Fanout, outbox: Outbox) -> None:
        self._fanout = fanout
        self._outbox = outbox
        self._subs: dict[str, _Opened] = {}
        self._stopping: set[asyncio.Task[None]] = set()

    def __contains__(self, key: str) -> bool:
        return key in self._subs

    def __len__(self) -> int:
        return len(self._subs)

    async def subscribe_job(
        self, job_id: str, after_events: int | None, after_logs: int | None, *, project: str = "*",
        heartbeats: bool = False, on_ready: OnReady | None = None,
    ) -> str:
        """Relay one job's events and log batches after the client's cursor; returns the subscription key.

        ``project`` is the one the client's ticket names for the job: only that project's subjects are read, so a
        job id reused in another project stays invisible. ``"*"`` (any project) is for a notifier with auth off.
        """
        key = job_key(job_id)
        plan = [(EVENTS, subjects.job_events(job_id, project), after_events),
                (LOGS, subjects.job_logs(job_id, project), after_logs)]
        await self._open(key, plan, live_only=False, exact=True, heartbeats=heartbeats, on_ready=on_ready)
        return key

    async def subscribe_project(
        self, project: str, after_events: int | None, *, heartbeats: bool = False, on_ready: OnReady | None = None,
    ) -> str:
        """Relay the events (not the logs) of every job of ``project``; without a cursor, only new ones.

        A project's history can be weeks of events of many jobs: the REST API serves that; the socket
        replays only when the client has a cursor, i.e. when it resumes.
        """
        key = project_key(project)
        plan = [(EVENTS, subjects.project_events(project), after_events)]
        await self._open(key, plan, live_only=after_events is None, exact=False, heartbeats=heartbeats,
                         on_ready=on_ready)
        return key

    async def unsubscribe(self, key: str) -> bool:
        """Stop one subscription; ``False`` when there was none."""
        opened = self._subs.pop(key, None)
        if opened is None:
            return False
        await self._release(opened)
        self._outbox.forget(key)
        return True

    async def close(self) -> None:
        """Stop feeding this client (first thing done when it goes away); its sent cursor stays readable."""
        subs, self._subs = self._subs, {}
        for opened in subs.values():
            await self._release(opened)
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)

    async def _open(
        self, key: str, plan: list[tuple[str, str, int | None]], *, live_only: bool, exact: bool, heartbeats: bool,
        on_ready: OnReady | None,
    ) -> None:
        if key in self._subs:
            raise ValueError(f"already subscribed: {key}")
        cursor = {label: after for label, _, after in plan}
        self._outbox.register(key, cursor)
        if on_ready is not None:
            on_ready(key, cursor)  # queued before any event of the subscription can be
        opened = _Opened()
        self._subs[key] = opened
        try:
            for label, subject, after in plan:
                listener = Listener(self._outbox, key, label, after, heartbeats)
                # Join the feed first: from here on nothing published is missed, it is buffered.
                feed = await self._fanout.join(key, label, subject, listener)
                opened.parts.append((feed, listener))
                if live_only or listener.caught_up():
                    listener.go_live()
                    continue
                if exact:
                    last = await self._fanout.last_seq(label, subject)
                    if last is None or last <= listener.gate.last:  # nothing to replay
                        listener.go_live()
                        continue
                listener.replay = await self._fanout.js.subscribe(
                    subject, stream=STREAM_OF[label], cb=self._replay_callback(listener), ordered_consumer=True,
                    config=consumer_config(after), idle_heartbeat=self._fanout.idle_heartbeat,
                )
        except BaseException:
            self._subs.pop(key, None)
            self._outbox.forget(key)
            await self._release(opened)
            raise

    async def _release(self, opened: _Opened) -> None:
        parts, opened.parts = opened.parts, []
        for feed, listener in parts:
            await self._fanout.leave(feed, listener)
            replay, listener.replay = listener.replay, None
            if replay is not None:
                await _unsubscribe_all([replay], self._fanout.js)

    def _stop_replay(self, listener: Listener) -> None:
        # Called from the replay consumer's own callback: unsubscribing there would cancel the running task.
        replay, listener.replay = listener.replay, None
        if replay is not None:
            task = asyncio.ensure_future(_unsubscribe_all([replay], self._fanout.js))
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    def _replay_callback(self, listener: Listener) -> Callable[[Msg], Awaitable[None]]:
        async def on_msg(msg: Msg) -> None:
            # Runs in nats-py's per-subscription task: it must never wait on the client's socket.
            if listener.is_live:
                return  # switched over; this consumer is being stopped
            seq = _stream_seq(listener.key, msg)
            if seq is None:
                return
            delivered = listener.deliver(Rendered(listener.key, listener.label, seq, msg.data, subject=msg.subject),
                                         "replay")
            if listener.caught_up(msg.metadata.num_pending):
                listener.go_live()
                self._stop_replay(listener)
            elif delivered:
                # nats-py hands a whole read of messages to this task without yielding; yielding after each
                # lets the sender drain as we go, so a history replay to a fast client never fills the queue.
                await asyncio.sleep(0)

        return on_msg


async def _unsubscribe_all(subs: list[JetStreamContext.PushSubscription], js: JetStreamContext | None = None) -> None:
    """Stop delivery; with ``js``, also delete the consumer now rather than after ``INACTIVE_THRESHOLD_S``."""
    for sub in subs:
        try:
            await sub.unsubscribe()
            stream, name = getattr(sub, "_stream", None), getattr(sub, "_consumer", None)
            if js is not None and stream and name:
                await js.delete_consumer(stream, name)
        except Exception as exc:  # noqa: BLE001 - connection closed or draining: the server reaps the consumer
            log.debug("unsubscribe failed: %s", exc)
