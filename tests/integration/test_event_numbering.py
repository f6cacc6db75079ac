"""The envelope's numbering as a consumer of ONE stream sees it (docs/events.md#sequence-numbers-what-a-consumer-can-
rely-on), on real parts: a nats-server, a real runner, trainers reporting through the real SDK.

The job's trainer reports metrics and log lines and starts a worker process that reports too (as a DDP rank-0
worker does: a second SDK publisher of source ``trainer``); its first attempt fails out of memory, so the runner
queues attempt 2 itself (an event on its own, source ``runner``) and then runs it (the runner's numbered events,
source ``runner`` too).  KILN_EVENTS read alone and KILN_LOGS read alone: for every publisher of every source each
event is ``next`` by ``kiln_contracts.seq_check``; both together, ``seq`` is 1..n per publisher.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections import defaultdict

import nats
from nats.js import JetStreamContext

from kiln_contracts import Event, JobStatus, StartJob, seq_check, streams
from kiln_contracts.service import publish_attempt
from kiln_testing.runners import EventLog, RunnerProc, spec

TRAINER = """
import os, subprocess, sys, time
import kiln_sdk

worker = os.environ.get("RANK") == "0"
child = None if worker else subprocess.Popen([sys.executable, __file__], env={**os.environ, "RANK": "0"})
with kiln_sdk.init() as run:
    for step in range(12):
        run.log_metrics(step, {"loss": 1.0 / (step + 1)})
        run.log(f"{'worker' if worker else 'main'} step {step}")
        print(f"stdout {step}", flush=True)
        time.sleep(0.05)
if child is not None:
    child.wait()
    if os.environ["KILN_ATTEMPT"] == "1":
        sys.exit("torch.OutOfMemoryError: CUDA out of memory")
"""

Key = tuple[str, int, str]


async def read_stream(js: JetStreamContext, subject: str) -> list[Event]:
    """Everything the stream holds on ``subject``, in stream order (an ordered consumer of that stream only)."""
    sub = await js.subscribe(subject, ordered_consumer=True)
    got: list[Event] = []
    try:
        while True:
            got.append(Event.model_validate_json((await sub.next_msg(timeout=1.0)).data))
    except asyncio.TimeoutError:
        pass
    finally:
        await sub.unsubscribe()
    return got


def check_alone(stream: str, got: list[Event]) -> dict[Key, list[int]]:
    """The rule of a one-stream consumer: each event follows the last one it holds from the same publisher."""
    last: dict[Key, int] = {}
    for ev in got:
        assert ev.publisher and ev.prev is not None, ev
        verdict = seq_check(last.get(ev.seq_key, 0), ev.seq, ev.prev)
        assert verdict == "next", (stream, ev.source, ev.seq_key, last.get(ev.seq_key, 0), ev.seq, ev.prev, ev.data.kind)
        last[ev.seq_key] = ev.seq
    seqs: dict[Key, list[int]] = defaultdict(list)
    for ev in got:
        seqs[ev.seq_key].append(ev.seq)
    return seqs


async def test_each_stream_alone_shows_every_publisher_gap_free(nats_server, tmp_path):
    data = tmp_path / "ds"
    data.mkdir()
    (data / "data.yaml").write_text("path: .\ntrain: images\nval: images\nnames: {0: a}\n")
    trainer = tmp_path / "trainer.py"
    trainer.write_text(TRAINER)
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await streams.ensure_streams(js)
    log = await EventLog().start(js)
    runner = RunnerProc(nats_server.url, tmp_path / "runners", "r", tmp_path / "fake.log",
                        trainer_cmd=[sys.executable, str(trainer)], heartbeat_s=0.2)
    try:
        await runner.ready()
        job = spec(str(data), project="numbers", max_attempts=2, retry_backoff_s=0.0)
        await publish_attempt(js, StartJob(job_id="n1", attempt=1, spec=job), source="api", reason="test")
        await log.wait(lambda: log.finished("n1"), timeout=90)
        assert [(e.attempt, e.data.status) for e in log.finished("n1")] == [(2, JobStatus.completed)]
        await asyncio.sleep(1.0)  # anything still on its way

        events = await read_stream(js, "kiln.evt.numbers.n1.>")
        logs = await read_stream(js, "kiln.log.numbers.n1")
        on_events, on_logs = check_alone("KILN_EVENTS", events), check_alone("KILN_LOGS", logs)
    finally:
        runner.kill(signal.SIGKILL)
        runner.proc.wait()
        await nc.close()

    everything = events + logs
    assert len({e.id for e in everything}) == len(everything)
    by_key: dict[Key, list[Event]] = defaultdict(list)
    for ev in everything:
        by_key[ev.seq_key].append(ev)
    for key, evs in by_key.items():  # both streams together: 1..n per publisher, none twice
        assert sorted(e.seq for e in evs) == list(range(1, len(evs) + 1)), (key, sorted(e.seq for e in evs))
        assert len({e.source for e in evs}) == 1

    def publishers(attempt: int, source: str) -> list[Key]:
        return sorted({k for k, evs in by_key.items() if k[1] == attempt and evs[0].source == source})

    # Attempt 1: queued by the API (an event on its own), the runner's numbered events, two SDK publishers.
    # Attempt 2: queued by the runner of attempt 1 (on its own), then the runner's numbered events and two more.
    assert [len(publishers(1, s)) for s in ("api", "runner", "trainer")] == [1, 1, 2]
    assert [len(publishers(2, s)) for s in ("api", "runner", "trainer")] == [0, 2, 2]
    queued = {e.attempt: e for e in everything if e.data.kind == "status" and e.data.status == JobStatus.queued}
    assert {a: (e.source, e.publisher, e.seq, e.prev) for a, e in queued.items()} == {
        1: ("api", "n1-1-queued", 1, 0), 2: ("runner", "n1-2-queued", 1, 0)}
    for attempt in (1, 2):
        for key in publishers(attempt, "trainer") + [k for k in publishers(attempt, "runner") if "queued" not in k[2]]:
            # each reported on both streams, so on each one alone its seq skips the other's numbers: prev links them
            assert on_events[key] and on_logs[key], key
            assert on_events[key] != list(range(1, len(on_events[key]) + 1)), key
    # By job, attempt and source alone (the rule before 'publisher') attempt 2's runner numbers would repeat 1.
    runner_2 = [e.seq for e in everything if e.attempt == 2 and e.source == "runner"]
    assert runner_2.count(1) == 2
    print(f"\n{len(events)} events on KILN_EVENTS, {len(logs)} on KILN_LOGS, {len(by_key)} publishers:")
    for key, evs in sorted(by_key.items(), key=lambda kv: (kv[0][1], kv[1][0].source, kv[0][2])):
        print(f"  attempt {key[1]} {evs[0].source:7s} {key[2]:12s} events {len(on_events.get(key, []))}, "
              f"logs {len(on_logs.get(key, []))}")
