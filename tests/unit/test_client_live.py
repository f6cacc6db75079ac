"""The client's notifier protocol without a socket: cursors, resume, duplicates, ticket renewal, reconnect delays."""

from __future__ import annotations

import base64
import json
import random

import pytest
from kiln_client import KilnError
from kiln_client.live import Grant, Schedule, Watch, offer, reconnect_delay, renew_after_s


def event(sub: str, stream: str, seq: int, kind: str = "epoch", job: str = "j-1") -> dict:
    data = {"kind": "epoch", "epoch": seq, "epochs": 9, "metrics": {}} if kind == "epoch" else \
        {"kind": "log", "lines": [{"text": f"line {seq}"}]}
    return {"type": "event", "sub": sub, "stream": stream, "seq": seq, "job_id": job,
            "event": {"v": 1, "id": f"e{seq}", "time": "2025-05-01T10:00:00Z", "job_id": job, "project": "p",
                      "attempt": 1, "source": "trainer", "seq": seq, "data": data}}


def jwt(iat: int) -> str:
    body = base64.urlsafe_b64encode(json.dumps({"iat": iat}).encode()).decode().rstrip("=")
    return f"h.{body}.s"


def test_events_move_the_cursors_per_stream_and_a_replay_overlap_is_dropped():
    w = Watch(jobs=["j-1"])
    assert w.subscribe_ops() == [{"op": "subscribe", "job_id": "j-1"}]  # no cursor: the whole history
    got = [w.handle(event("job:j-1", "events", n)).event for n in (3, 4)]
    got.append(w.handle(event("job:j-1", "logs", 2, kind="log")).event)
    assert [(e.stream, e.seq, e.kind) for e in got] == [("events", 3, "epoch"), ("events", 4, "epoch"),
                                                         ("logs", 2, "log")]
    # the reconnect subscribes after both cursors; the notifier's replay may overlap: nothing comes twice
    assert w.subscribe_ops() == [{"op": "subscribe", "job_id": "j-1", "after_events": 4, "after_logs": 2}]
    assert w.handle(event("job:j-1", "events", 4)).event is None
    assert w.handle(event("job:j-1", "events", 5)).event.seq == 5
    assert w.cursors() == {"job:j-1": {"after_events": 5, "after_logs": 2}}


def test_a_project_watch_resumes_from_a_given_cursor_and_skips_what_it_cannot_read():
    w = Watch(projects=["vision"], after={"project:vision": {"after_events": 120}}, heartbeats=True)
    assert w.scope() == {"jobs": [], "projects": ["vision"]}
    assert w.subscribe_ops() == [{"op": "subscribe", "project": "vision", "after_events": 120, "heartbeats": True}]
    unknown = event("project:vision", "events", 121)
    unknown["event"]["data"] = {"kind": "from-the-future"}
    assert w.handle(unknown).event is None and w.cursors()["project:vision"]["after_events"] == 121
    assert w.handle(event("job:other", "events", 1)).event is None  # not ours
    with pytest.raises(ValueError):
        Watch()


def test_notifier_answers_become_actions_and_a_hopeless_refusal_an_error():
    w = Watch(jobs=["j-1"])
    assert w.handle({"type": "authorized", "expires_at": 1000}).deadline == 1000.0
    assert w.handle({"type": "error", "sub": "job:j-1", "reason": "job j-1 is not covered by this ticket: ask the "
                                                                  "API for a ticket that names it"}).renew
    assert w.handle({"type": "error", "sub": "job:j-1",
                     "reason": "subscription failed, retry later: TimeoutError"}).resubscribe == "job:j-1"
    assert w.handle({"type": "error", "reason": "renewal refused: ticket expired"}).retry_renewal
    assert w.handle({"type": "overflow", "dropped_after": {}}).event is None
    with pytest.raises(KilnError, match="the notifier refused job:j-1: at most 100 subscriptions"):
        w.handle({"type": "error", "sub": "job:j-1", "reason": "at most 100 subscriptions"})


def test_the_ticket_is_renewed_at_80_percent_of_the_shorter_allowance():
    t = jwt(iat=1000)
    assert renew_after_s(t, 300) == 240.0
    assert renew_after_s(t, 300, notifier_expires_at=1100) == 80.0  # the notifier is stricter: its deadline wins
    plan = Schedule(Grant(t, 300, fetched_at=50.0))
    assert plan.wait(now=50.0) == 240.0 and not plan.renew_due(289.0) and plan.renew_due(290.0)
    plan.apply(Watch(jobs=["j"]).handle({"type": "authorized", "expires_at": 1100}), now=51.0)
    assert plan.renew_due(130.0)
    plan.apply(Watch(jobs=["j"]).handle({"type": "error", "reason": "renewal refused: x"}), now=130.0)
    assert plan.wait(now=130.0) == 5.0
    plan.apply(Watch(jobs=["j"]).handle({"type": "error", "sub": "job:j", "reason": "retry later"}), now=131.0)
    assert plan.resubscribe_due(132.0) == [] and plan.resubscribe_due(133.0) == ["job:j"]
    assert Schedule(None).wait(now=0.0) is None  # no ticket (auth off): nothing to renew
    long = "x" * 5000
    assert offer(long) == (["kiln.v1"], {"op": "auth", "ticket": long})  # too long for a header: the first frame


def test_reconnect_backs_off_except_after_a_working_socket_asked_to_come_back():
    rng = random.Random(1)
    assert reconnect_delay(4401, 0) == reconnect_delay(1013, 0) == 0.2
    delays = [reconnect_delay(None, n, rng) for n in range(12)]
    assert all(0.375 <= d <= 37.5 for d in delays) and delays[-1] >= 22.5 and delays[0] <= 0.625
    with pytest.raises(KilnError, match="1008"):
        reconnect_delay(1008, 0)
