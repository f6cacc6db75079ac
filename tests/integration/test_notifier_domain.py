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
    MAX_SEQ,
    Auth,
    Outbox,
    Outgoing,
    Renew,
    SeqGate,
    Subscribe,
    Unsubscribe,
    event_message,
    job_socket_op,
    origin_allowed,
    overflow_message,
    parse_op,
)
from kiln_notifier.settings import NotifierSettings
from pydantic import ValidationError

from kiln_testing.notifier import PRIVATE_KEY, public_key_file


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


def test_parse_ticket_ops_never_echo_the_ticket() -> None:
    op = parse_op('{"op": "auth", "ticket": "eyJ.secret.sig"}')
    assert isinstance(op, Auth) and op.ticket == "eyJ.secret.sig" and "secret" not in repr(op)
    assert isinstance(parse_op('{"op": "renew", "ticket": "t"}'), Renew)
    for bad in ('{"op": "renew", "ticket": 12345}', '{"op": "auth", "ticket": "eyJ.secret.sig", "x": 1}'):
        with pytest.raises(ValueError) as refused:
            parse_op(bad)
        assert "secret" not in str(refused.value) and "12345" not in str(refused.value)
    with pytest.raises(ValueError, match="^unknown op: expected one of auth, renew, subscribe, unsubscribe$"):
        parse_op('{"op": "explode"}')


@pytest.mark.parametrize(("query", "reason"), [
    ({"after_events": "abc"}, "after_events: Input should be a valid integer"),
    ({"after_logs": "-1"}, "after_logs: Input should be greater than or equal to 0"),
    ({"after_events": str(MAX_SEQ + 1)}, "after_events: Input should be less than or equal to 9223372036854775807"),
    ({"heartbeats": "maybe"}, "heartbeats: Input should be a valid boolean"),
])
def test_job_socket_query_is_checked_with_a_reason(query: dict[str, str], reason: str) -> None:
    with pytest.raises(ValueError) as refused:
        job_socket_op("j1", query)
    assert str(refused.value).startswith(reason)


def test_job_socket_query_accepts_cursors_up_to_the_largest_sequence() -> None:
    op = job_socket_op("j1", {"after_events": str(MAX_SEQ), "after_logs": "0", "heartbeats": "1", "x": "ignored"})
    assert (op.key, op.after_events, op.after_logs, op.heartbeats) == ("job:j1", MAX_SEQ, 0, True)


def test_origin_policy() -> None:
    assert origin_allowed("https://evil.example", [])  # auth off: an empty list means no check
    assert not origin_allowed("https://evil.example", [], listed_only=True)  # auth on: no browser origin
    assert origin_allowed(None, [], listed_only=True)  # non-browser clients send no Origin: their ticket guards them
    assert origin_allowed(None, ["https://kiln.example"])
    assert origin_allowed("https://kiln.example/", ["https://kiln.example"], listed_only=True)
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
    # Another job's event on this job's subject (a trainer publishes only on its own): never relayed.
    forged = _event(Heartbeat(runner="r")).model_copy(update={"job_id": "victim"})
    assert Rendered("job:j1", "events", 10, forged.to_bytes(), subject=item_subject(forged, "j1")).text(True) is None
    own = _event(Heartbeat(runner="r"))
    assert Rendered("job:j1", "events", 11, own.to_bytes(), subject=own.subject).text(True) is not None


def test_consumer_start_positions() -> None:
    assert consumer_config(None).deliver_policy == api.DeliverPolicy.ALL
    assert consumer_config(None, live_only=True).deliver_policy == api.DeliverPolicy.NEW
    cfg = consumer_config(7, live_only=True)
    assert (cfg.deliver_policy, cfg.opt_start_seq) == (api.DeliverPolicy.BY_START_SEQUENCE, 8)


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_NOTIFIER_TICKET_PUBLIC_KEY_FILE", str(public_key_file()))
    monkeypatch.setenv("KILN_NOTIFIER_ALLOWED_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("KILN_NOTIFIER_CLIENT_QUEUE", "5")
    settings = NotifierSettings()
    assert settings.allowed_origins == ["https://a.example", "https://b.example"]
    assert (settings.client_queue, settings.host, settings.port) == (5, "127.0.0.1", 8001)
    assert (settings.auth, settings.recheck_s, settings.auth_timeout_s) == ("tickets", 300, 5)
    assert settings.public_key == public_key_file().read_bytes()
    monkeypatch.setenv("KILN_NOTIFIER_ALLOWED_ORIGINS", '["https://c.example"]')
    assert NotifierSettings().allowed_origins == ["https://c.example"]


def test_settings_refuse_auth_without_a_usable_key(tmp_path) -> None:
    with pytest.raises(ValidationError, match="KILN_NOTIFIER_TICKET_PUBLIC_KEY_FILE is required"):
        NotifierSettings()
    with pytest.raises(ValidationError, match="cannot read the ticket public key file"):
        NotifierSettings(ticket_public_key_file=tmp_path / "missing.pem")
    (tmp_path / "private.pem").write_bytes(PRIVATE_KEY)  # the wrong half of the pair
    with pytest.raises(ValidationError, match="is not a PEM public key"):
        NotifierSettings(ticket_public_key_file=tmp_path / "private.pem")


def test_settings_allow_auth_off_on_loopback_only() -> None:
    assert NotifierSettings(auth="off", host="::1").public_key is None
    with pytest.raises(ValidationError, match="loopback host only, not 0.0.0.0"):
        NotifierSettings(auth="off", host="0.0.0.0")


@pytest.mark.parametrize("recheck_s", [0, -1, 301])
def test_settings_bound_the_recheck(recheck_s: float) -> None:
    with pytest.raises(ValidationError, match="recheck_s"):
        NotifierSettings(ticket_public_key_file=public_key_file(), recheck_s=recheck_s)


def item_subject(event: Event, job_id: str) -> str:
    """The subject ``event`` would come on were it ``job_id``'s."""
    return event.model_copy(update={"job_id": job_id}).subject
