"""The runner's event publisher (``JobEvents``) against a fake JetStream: how it numbers (``seq`` over both streams,
``prev`` per stream, one ``publisher``), how it retries (kiln_contracts.retry) and spools, and that a caller cancelled
mid-publish neither loses the numbered event nor sends its lines twice."""

from __future__ import annotations

import asyncio
import logging

import pytest

from kiln_contracts import Event, Heartbeat, JobSpec, LogBatch, StartJob, seq_check
from kiln_runner.adapters import events as events_mod
from kiln_runner.adapters.events import JobEvents
from kiln_sdk.spool import Spool


class FakeJS:
    """Stores what it is given; ``fail`` publishes raise, each publish waits on ``gate`` when one is set."""

    def __init__(self, fail: int = 0) -> None:
        self.stored: list[Event] = []
        self.calls = 0
        self.fail = fail
        self.gate: asyncio.Event | None = None

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str], timeout: float) -> None:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            self.fail -= 1
            raise ConnectionError("no responders")
        ev = Event.model_validate_json(payload)
        assert headers == {"Nats-Msg-Id": ev.id} and subject == ev.subject
        self.stored.append(ev)


def cmd() -> StartJob:
    return StartJob(job_id="j1", attempt=2, spec=JobSpec(model="yolov8n.yaml", dataset="/d", project="p"))


def check_each_stream(stored: list[Event]) -> None:
    for stream in ("events", "logs"):
        last: dict[tuple[str, int, str], int] = {}
        for ev in (e for e in stored if e.stream == stream):
            assert seq_check(last.get(ev.seq_key, 0), ev.seq, ev.prev) == "next", (stream, ev.seq, ev.prev)
            last[ev.seq_key] = ev.seq


@pytest.fixture(autouse=True)
def no_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events_mod, "PUBLISH_WAITS_S", (0.0, 0.0))


def test_seq_counts_both_streams_and_prev_links_each_one() -> None:
    async def main() -> list[Event]:
        js = FakeJS()
        out = JobEvents(js, cmd())  # type: ignore[arg-type]
        await out.emit(Heartbeat(runner="r"))
        out.line("a")
        await out.flush_logs()
        await out.emit(Heartbeat(runner="r"))
        out.line("b")
        await out.flush_logs()
        await out.emit(Heartbeat(runner="r"))
        return js.stored

    stored = asyncio.run(main())
    assert [(e.seq, e.prev, e.stream) for e in stored] == [
        (1, 0, "events"), (2, 0, "logs"), (3, 1, "events"), (4, 2, "logs"), (5, 3, "events")]
    assert len({e.publisher for e in stored}) == 1 and {e.source for e in stored} == {"runner"}
    assert {(e.job_id, e.attempt, e.project) for e in stored} == {("j1", 2, "p")}
    check_each_stream(stored)


def test_a_failed_publish_is_retried_then_spooled_and_every_failure_logged(tmp_path, caplog) -> None:
    async def main(js: FakeJS, spool: Spool) -> tuple[bool, bool]:
        spooled: list[int] = []
        out = JobEvents(js, cmd(), spool=spool, spooled=lambda: spooled.append(1))  # type: ignore[arg-type]
        first = await out.emit(Heartbeat(runner="r"))  # three tries, all refused: spooled
        assert spooled == [1]
        second = await out.emit(Heartbeat(runner="r"))  # behind the spooled one, without trying
        return first, second

    js = FakeJS(fail=3)
    spool = Spool(tmp_path / "runner-spool")
    with caplog.at_level(logging.WARNING, logger="kiln.runner"):
        assert asyncio.run(main(js, spool)) == (False, False)
    assert js.calls == events_mod.PUBLISH_ATTEMPTS == 3 and js.stored == []
    assert [r.getMessage() for r in caplog.records].count("publish of heartbeat failed (no responders), retrying") == 3
    lines = [Event.model_validate_json(line) for line, _ in spool.read(10)]
    assert [(e.seq, e.prev) for e in lines] == [(1, 0), (2, 1)]


def test_a_publish_that_goes_through_on_the_last_try_is_not_spooled(tmp_path) -> None:
    js = FakeJS(fail=2)
    spool = Spool(tmp_path / "runner-spool")
    assert asyncio.run(JobEvents(js, cmd(), spool=spool).emit(Heartbeat(runner="r")))  # type: ignore[arg-type]
    assert js.calls == 3 and [e.seq for e in js.stored] == [1] and not spool.pending


def test_a_caller_cancelled_mid_publish_loses_nothing_and_sends_nothing_twice() -> None:
    """The heartbeat and log-flush loops are cancelled when the trainer exits, possibly inside a publish: the numbered
    event is still published, before anything numbered after it, and the final flush sends only the lines left."""

    async def main() -> list[Event]:
        js = FakeJS()
        out = JobEvents(js, cmd())  # type: ignore[arg-type]
        for i in range(700):
            out.line(f"line {i}")
        js.gate = asyncio.Event()
        flush = asyncio.create_task(out.flush_logs())  # 700 lines: a batch of 500, then one of 200
        beat = asyncio.create_task(out.emit(Heartbeat(runner="r")))
        await asyncio.sleep(0.05)
        assert js.calls == 1  # the first batch is in its publish, the rest waits its turn
        flush.cancel()
        beat.cancel()
        await asyncio.gather(flush, beat, return_exceptions=True)
        js.gate.set()
        out.line("last")
        await out.flush_logs()  # the run's final flush
        await out.emit(Heartbeat(runner="r"))
        return js.stored

    stored = asyncio.run(main())
    texts = [ln.text for e in stored if isinstance(e.data, LogBatch) for ln in e.data.lines]
    assert texts == [f"line {i}" for i in range(700)] + ["last"]
    assert [e.seq for e in stored] == list(range(1, len(stored) + 1))
    assert [e.data.kind for e in stored] == ["log", "heartbeat", "log", "heartbeat"]
    check_each_stream(stored)

