"""Notifier pure logic (no server, no NATS): messages, operations, policies, settings.

Unit tests by nature; they live beside the integration tests because the notifier owns only test_notifier*.py.
"""

from __future__ import annotations

import json

import pytest
from kiln_contracts import EpochCompleted, Event, Heartbeat
from nats.js import api

from kiln_notifier.adapters.jetstream import Feed, Listener, Rendered, consumer_config
from kiln_notifier.domain import (
    Outbox,
    Outgoing,
    SeqGate,
    Subscribe,
    Unsubscribe,
    event_message,
    origin_allowed,
    overflow_message,
    parse_op,
)
from kiln_notifier.settings import NotifierSettings


def _event(data=None) -> Event:
    data = data or EpochCompleted(epoch=1, epochs=3, metrics={"fitness": 0.5})
    return Event.new(job_id="j1", project="p", attempt=1, seq=1, source="trainer", data=data)


def test_event_message_wraps_the_envelope() -> None:
    ev = _event()
    msg = json.loads(event_message("job:j1", "events", 42, ev.to_bytes()) or "")
    assert msg == {"type": "event", "sub": "job:j1", "stream": "events", "seq": 42, "job_id": "j1",
                   "event": json.loads(ev.model_dump_json())}


def test_heartbeats_filtered_unless_asked() -> None:
    raw = _event(Heartbeat(runner="r1")).to_bytes()
    assert event_message("job:j1", "events", 1, raw) is None
    assert json.loads(event_message("job:j1", "events", 1, raw, heartbeats=True) or "")["seq"] == 1


FUTURE = json.dumps(json.loads(_event().to_bytes()) | {"v": 2}).encode()


@pytest.mark.parametrize("raw", [b"", b"not json", b"{}", b'{"v": 2}', FUTURE])
def test_invalid_or_unknown_version_raises_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        event_message("job:j1", "events", 1, raw)


def test_parse_op() -> None:
    op = parse_op('{"op": "subscribe", "job_id": "j1", "after_events": 5}')
    assert isinstance(op, Subscribe) and (op.key, op.after_events, op.after_logs) == ("job:j1", 5, None)
    op = parse_op('{"op": "unsubscribe", "project": "p"}')
    assert isinstance(op, Unsubscribe) and op.key == "project:p"
    for bad in ("{", "[]", '{"op": "x"}', '{"op": "subscribe"}', '{"op": "subscribe", "job_id": "j", "project": "p"}',
                '{"op": "subscribe", "job_id": "a.>"}', '{"op": "subscribe", "job_id": "j", "after_events": -1}',
                '{"op": "subscribe", "project": "p", "after_logs": 1}', '{"op": "subscribe", "job_id": "j", "x": 1}'):
        with pytest.raises(ValueError):
            parse_op(bad)


def test_origin_policy() -> None:
    assert origin_allowed("https://evil.example", [])
    assert origin_allowed(None, ["https://kiln.example"])  # non-browser clients send no Origin
    assert origin_allowed("https://kiln.example/", ["https://kiln.example"])
    assert not origin_allowed("https://evil.example", ["https://kiln.example"])


def test_seq_gate_drops_replays() -> None:
    gate = SeqGate()
    assert [gate.accept(s) for s in (1, 2, 1, 2, 3)] == [True, True, False, False, True]


async def test_outbox_overflow_latches_and_reports_sent_cursor() -> None:
    box = Outbox(capacity=2)
    box.register("job:j1", {"events": 10, "logs": None})
    assert box.offer(Outgoing("a", "job:j1", "events", 11)) and box.offer(Outgoing("b", "job:j1", "logs", 3))
    box.mark_sent(await box.get())
    assert box.offer(Outgoing("c", "job:j1", "events", 12))
    assert not box.offer(Outgoing("d", "job:j1", "events", 13))  # full: overflow
    assert box.overflowed.is_set()
    assert not box.offer(Outgoing("e"))  # latched even with room again
    box.mark_sent(await box.get())
    assert box.cursor() == {"job:j1": {"events": 11, "logs": 3}}
    assert json.loads(overflow_message(box.cursor())) == {
        "type": "overflow", "dropped_after": {"job:j1": {"after_events": 11, "after_logs": 3}}}


def _drain(box: Outbox) -> list[int]:
    seqs = []
    while box.qsize():
        item = box._queue.get_nowait()
        seqs.append(item.seq)
    return seqs


def test_listener_switches_from_replay_to_feed_without_gap_or_duplicate() -> None:
    data = _event().to_bytes()
    feed = Feed("job:j1", "events", "subj", high=5)  # the stream ended at 5 when the feed started
    box = Outbox(capacity=10)
    listener = Listener(box, "job:j1", "events", after=2, heartbeats=False)
    feed.add(listener)
    assert listener.live_from == 6 and not listener.caught_up()
    for seq in (6, 7):  # live messages while the client replays: held back
        listener.from_feed(Rendered("job:j1", "events", seq, data))
    for seq in (3, 5, 6):  # the replay: 4 is another job's, 6 was also live
        listener.deliver(Rendered("job:j1", "events", seq, data))
    assert listener.caught_up()
    listener.go_live()
    listener.from_feed(Rendered("job:j1", "events", 8, data))
    assert _drain(box) == [3, 5, 6, 7, 8]


def test_listener_buffer_counts_against_the_queue() -> None:
    box = Outbox(capacity=2)
    listener = Listener(box, "job:j1", "events", after=None, heartbeats=False)
    for seq in (1, 2, 3):
        listener.from_feed(Rendered("job:j1", "events", seq, b"{}"))
    assert box.overflowed.is_set()


def test_rendered_once_per_heartbeat_setting() -> None:
    item = Rendered("job:j1", "events", 9, _event(Heartbeat(runner="r")).to_bytes())
    assert item.text(False) is None and item.text(True) is not None
    assert item.text(True) is item.text(True)
    assert Rendered("job:j1", "events", 9, b"not json").text(False) is None


def test_consumer_start_positions() -> None:
    assert consumer_config(None).deliver_policy == api.DeliverPolicy.ALL
    assert consumer_config(None, live_only=True).deliver_policy == api.DeliverPolicy.NEW
    cfg = consumer_config(7, live_only=True)
    assert (cfg.deliver_policy, cfg.opt_start_seq) == (api.DeliverPolicy.BY_START_SEQUENCE, 8)


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_NOTIFIER_ALLOWED_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("KILN_NOTIFIER_CLIENT_QUEUE", "5")
    settings = NotifierSettings()
    assert settings.allowed_origins == ["https://a.example", "https://b.example"]
    assert (settings.client_queue, settings.host, settings.port) == (5, "127.0.0.1", 8001)
    monkeypatch.setenv("KILN_NOTIFIER_ALLOWED_ORIGINS", '["https://c.example"]')
    assert NotifierSettings().allowed_origins == ["https://c.example"]
