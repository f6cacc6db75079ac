"""The SDK against a real nats-server with JetStream: delivery, order, outages, spool replay, signals."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import nats
import pytest
from kiln_contracts import Event, streams, subjects

from kiln_sdk import JobContext, NatsReporter, Run
from kiln_sdk import nats_reporter
from kiln_sdk.spool import replay

PROJECT = "sdktest"


async def ensure(url: str) -> None:
    nc = await nats.connect(url)
    try:
        await streams.ensure_streams(nc.jetstream())
    finally:
        await nc.close()


async def fetch(url: str, subject: str, stream: str = "KILN_EVENTS") -> list[tuple[str, Event]]:
    """Every message of ``subject`` in ``stream``, in stream order, as (Nats-Msg-Id, Event)."""
    nc = await nats.connect(url)
    out: list[tuple[str, Event]] = []
    try:
        sub = await nc.jetstream().pull_subscribe(subject, stream=stream)
        total = (await sub.consumer_info()).num_pending  # everything stored now: read exactly that many
        while len(out) < total:
            msgs = await sub.fetch(min(500, total - len(out)), timeout=10)
            out += [((m.headers or {}).get("Nats-Msg-Id", ""), Event.model_validate_json(m.data)) for m in msgs]
            for m in msgs:  # beyond max_ack_pending (1,000) the server would stop delivering
                await m.ack()
        await sub.unsubscribe()
    finally:
        await nc.close()
    return out


def new_run(url: str | None, tmp_path: Path, **options) -> Run:
    job = f"sdk-{uuid.uuid4().hex[:10]}"
    ctx = JobContext(job_id=job, project=PROJECT, attempt=2, nats_url=url, job_dir=tmp_path,
                     spool_dir=tmp_path / "spool")
    return Run(ctx, NatsReporter(url, job, PROJECT, 2, ctx.spool_dir, **options))


async def test_thousand_metrics_arrive_once_in_order(nats_url: str, tmp_path: Path) -> None:
    await ensure(nats_url)
    run = new_run(nats_url, tmp_path)
    for i in range(1000):
        run.log_metrics(i, {"loss": 1.0 / (i + 1), "lr": 0.01})
    assert run.finish(timeout=30)

    got = await fetch(nats_url, subjects.job_events(run.job_id or ""))
    assert len(got) == 1000
    assert [e.seq for _, e in got] == list(range(1, 1001))
    assert [e.data.step for _, e in got] == list(range(1000))
    assert all(msg_id == e.id for msg_id, e in got)
    assert {(e.source, e.attempt, e.project) for _, e in got} == {("trainer", 2, PROJECT)}
    assert not (tmp_path / "spool" / "events.jsonl").exists()


async def test_server_restart_while_publishing_loses_and_duplicates_nothing(nats_server, tmp_path: Path) -> None:
    await ensure(nats_server.url)
    run = new_run(nats_server.url, tmp_path, ack_timeout=1.0)
    reporter = run.reporter
    assert isinstance(reporter, NatsReporter)
    n = 900
    for i in range(n):
        if i == 300:
            nats_server.stop()
        if i == 600:
            deadline = time.monotonic() + 15  # a loaded machine may take a while to see the dead connection
            while not reporter.stats["spooled"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert reporter.stats["spooled"] > 0  # the outage went to disk
            nats_server.start()
        run.log_metrics(i, {"loss": float(i)})
        time.sleep(0.002)  # a training loop, not a burst: the outage happens mid-stream
    assert run.finish(timeout=30), reporter.stats

    got = await fetch(nats_server.url, subjects.job_events(run.job_id or ""))
    ids = [e.id for _, e in got]
    assert len(got) == n and len(set(ids)) == n
    assert sorted(e.seq for _, e in got) == list(range(1, n + 1))
    assert [e.seq for _, e in got] == list(range(1, n + 1)), "replayed events keep their order"
    assert not (tmp_path / "spool" / "events.jsonl").exists()


async def test_nats_down_at_start_then_up_delivers_everything_in_order(nats_server, tmp_path: Path) -> None:
    await ensure(nats_server.url)
    nats_server.stop()
    run = new_run(nats_server.url, tmp_path)
    for i in range(100):
        run.log_metrics(i, {"loss": float(i)})
    time.sleep(2.5)  # past the publisher's 2 s wait for a first connection: these go to the spool
    assert run.reporter.stats["spooled"] == 100  # type: ignore[attr-defined]
    nats_server.start()
    for i in range(100, 200):
        run.log_metrics(i, {"loss": float(i)})
    assert run.finish(timeout=30), run.reporter.stats

    got = await fetch(nats_server.url, subjects.job_events(run.job_id or ""))
    assert [e.seq for _, e in got] == list(range(1, 201))


async def test_coalesced_updates_are_counted_in_a_later_message(nats_url: str, tmp_path: Path) -> None:
    await ensure(nats_url)
    run = new_run(nats_url, tmp_path, maxsize=10, autostart=False)  # nobody drains yet: the queue fills
    for i in range(10):
        run.log_metrics(i, {"loss": float(i)})
    for i in range(100):
        run.log_metrics(99, {"loss": float(i), f"k{i % 3}": 1.0})
    run.reporter.start()  # type: ignore[attr-defined]
    assert run.finish(timeout=20)

    got = [e.data for _, e in await fetch(nats_url, subjects.job_events(run.job_id or ""))]
    assert [m.step for m in got] == [*range(10), 99]
    assert got[-1].coalesced == 99 and got[-1].metrics == {"loss": 99.0, "k0": 1.0, "k1": 1.0, "k2": 1.0}
    assert sum(m.coalesced for m in got) + len(got) == 110


async def test_spool_without_nats_then_runner_replay(nats_url: str, tmp_path: Path) -> None:
    await ensure(nats_url)
    run = new_run(None, tmp_path)  # no KILN_NATS_URL: everything is spooled
    for i in range(50):
        run.log_metrics(i, {"loss": float(i)})
    run.log("spooled line")
    assert not run.finish(timeout=0.5)
    spool = tmp_path / "spool"
    assert len((spool / "events.jsonl").read_text().splitlines()) == 51

    assert await replay(spool, nats_url) == 51
    assert not (spool / "events.jsonl").exists()
    assert await replay(spool, nats_url) == 0
    events = await fetch(nats_url, subjects.job_events(run.job_id or ""))
    logs = await fetch(nats_url, subjects.job_logs(run.job_id or ""), stream="KILN_LOGS")
    assert [e.seq for _, e in events] == list(range(1, 51))
    assert [(e.seq, e.data.lines[0].text) for _, e in logs] == [(51, "spooled line")]


SCRIPT = textwrap.dedent("""
    import signal, sys, time, kiln_sdk
    if sys.argv[1] == "chain":  # the script's own handler runs after the SDK flushed
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(7))
    run = kiln_sdk.init()
    for i in range(200):
        kiln_sdk.log_metrics(i, {"loss": float(i)})
    print("ready", flush=True)
    if sys.argv[1] == "raise":
        raise RuntimeError("boom")
    time.sleep(60)
""")


_NANOSLEEP = {"x86_64": "230", "aarch64": "115"}.get(os.uname().machine)


def wait_until_asleep(pid: int, limit: float = 5.0) -> None:
    """Wait until ``pid``'s main thread is inside ``time.sleep``'s clock_nanosleep.

    A signal that lands between the interpreter's last signal check and the start of that system call cannot
    interrupt it (a CPython limit, not the SDK's), so the handler would run only when the sleep ends.  Training loops
    return to bytecode all the time; this test's script sleeps once, so it signals only once the sleep has begun,
    which still fails when the signal goes to a thread other than the main one.
    """
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if open(f"/proc/{pid}/syscall").read().split()[0] == _NANOSLEEP:
                return
        except (OSError, IndexError):
            time.sleep(0.5)  # not readable here: give the script time to get into its sleep
            return
        time.sleep(0.005)


@pytest.mark.parametrize("how", ["sigterm", "chain", "raise"])
async def test_trainer_process_flushes_on_sigterm_and_on_exception(nats_url: str, tmp_path: Path, how: str) -> None:
    await ensure(nats_url)
    job = f"sdk-{how}-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "KILN_JOB_ID": job, "KILN_PROJECT": PROJECT, "KILN_ATTEMPT": "1",
           "KILN_NATS_URL": nats_url, "KILN_JOB_DIR": str(tmp_path), "PYTHONFAULTHANDLER": "1",
           "KILN_SYSTEM_METRICS_S": "0"}  # only the script's own 200 events
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, how], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        if how != "raise":
            wait_until_asleep(proc.pid)
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # the fault handler prints every thread's stack
            pytest.fail(f"the trainer did not exit; its threads:\n{proc.communicate(timeout=10)[1][-6000:]}")
    finally:
        proc.kill()
    assert code == {"sigterm": -signal.SIGTERM, "chain": 7, "raise": 1}[how]
    got = await fetch(nats_url, subjects.job_events(job))
    assert [e.seq for _, e in got] == list(range(1, 201))


def test_log_metrics_never_blocks_while_nats_is_down(tmp_path: Path) -> None:
    run = new_run("nats://127.0.0.1:9", tmp_path)  # nothing listens there
    t0 = time.perf_counter()
    for i in range(10_000):
        run.log_metrics(i, {"loss": 1.0})
    # About 0.04 s alone; the bound only has to tell "never waits for NATS" (a wait would cost seconds per call)
    # from a busy machine, where the publisher thread's spooling competes for the GIL (1.1 s seen under load).
    assert time.perf_counter() - t0 < 3.0
    threading.Event().wait(0.1)
    assert not run.finish(timeout=1.0)
    assert run.reporter.stats["spooled"] + run.reporter.stats["coalesced"] >= 10_000 - 10  # type: ignore[attr-defined]


async def test_events_without_a_stream_are_spooled_then_replayed(nats_server, tmp_path: Path) -> None:
    run = new_run(nats_server.url, tmp_path, ack_timeout=1.0)  # a fresh server: no stream takes these subjects
    for i in range(20):
        run.log_metrics(i, {"loss": float(i)})
    assert not run.finish(timeout=2.0)  # every publish answered "no responders": kept, not dropped
    assert len((tmp_path / "spool" / "events.jsonl").read_text().splitlines()) == 20
    await ensure(nats_server.url)
    assert await replay(tmp_path / "spool", nats_server.url) == 20
    got = await fetch(nats_server.url, subjects.job_events(run.job_id or ""))
    assert [e.seq for _, e in got] == list(range(1, 21))


async def test_pipelined_window_keeps_order_across_many_batches(nats_url: str, tmp_path: Path) -> None:
    await ensure(nats_url)
    run = new_run(nats_url, tmp_path, batch=100, max_inflight=300)  # many batches in flight at once
    for i in range(5000):
        run.log_metrics(i, {"loss": float(i)})
        if i % 1000 == 999:
            time.sleep(0.01)
    assert run.finish(timeout=60), run.reporter.stats
    got = await fetch(nats_url, subjects.job_events(run.job_id or ""))
    assert [e.seq for _, e in got] == list(range(1, 5001 - run.reporter.stats["coalesced"]))  # type: ignore[attr-defined]


async def until(cond, t0: float, limit: float = 10.0) -> float:  # noqa: ANN001
    """Wait until ``cond()`` holds (at most ``limit`` s after ``t0``); the seconds from ``t0`` to then."""
    while not cond() and time.monotonic() - t0 < limit:
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


async def test_after_a_progress_event_the_publisher_sleeps_until_the_next_event_and_metrics_still_wake_it(
        nats_url: str, tmp_path: Path, monkeypatch) -> None:
    """A one-off event (progress, 4 a second from the Ultralytics hooks) costs one wake-up, not a 50 ms poll on top;
    a metric logged while the publisher sleeps that long still goes out at once, and nothing is lost or reordered."""
    await ensure(nats_url)
    monkeypatch.setattr(nats_reporter, "IDLE_MAX_S", 30.0)
    monkeypatch.setattr(nats_reporter, "IDLE_POLL_S", 5.0)  # a short poll after progress would show as a 5 s delay
    run = new_run(nats_url, tmp_path)
    reporter = run.reporter
    assert isinstance(reporter, NatsReporter)
    await until(lambda: reporter._loop is not None, time.monotonic())  # connected and pumping
    t0 = time.monotonic()
    run.progress(1, 2, 1, 4, images_per_s=10.0, eta_s=3.0)
    took = await until(lambda: reporter.stats["delivered"] >= 1, t0)
    assert reporter.stats["delivered"] == 1 and took < 2.5
    took = await until(lambda: reporter._deep_sleep, t0)
    assert reporter._deep_sleep and took < 2.5  # not a 5 s poll first
    t1 = time.monotonic()
    run.log_metrics(1, {"loss": 0.5})  # metrics wake a publisher in its long sleep
    took = await until(lambda: reporter.stats["delivered"] >= 2, t1)
    assert reporter.stats["delivered"] == 2 and took < 2.5
    assert run.finish(timeout=10)
    got = await fetch(nats_url, subjects.job_events(run.job_id or ""))
    assert [e.data.kind for _, e in got] == ["progress", "metrics"] and [e.seq for _, e in got] == [1, 2]


async def test_an_idle_publisher_backs_off_and_the_next_metric_still_goes_out_at_once(
        nats_url: str, tmp_path: Path, monkeypatch) -> None:
    await ensure(nats_url)
    monkeypatch.setattr(nats_reporter, "IDLE_MAX_S", 30.0)
    run = new_run(nats_url, tmp_path)
    reporter = run.reporter
    assert isinstance(reporter, NatsReporter)
    run.log_metrics(0, {"loss": 1.0})
    assert run.flush(10)
    await asyncio.sleep(3.5)  # one poll after 0.05 s found nothing: now in a sleep of 30 s
    assert reporter._deep_sleep
    t0 = time.monotonic()
    run.log_metrics(1, {"loss": 0.5})  # metrics wake a publisher in a long sleep
    took = await until(lambda: reporter.stats["delivered"] >= 2, t0)
    assert reporter.stats["delivered"] == 2 and took < 1.5
    assert run.finish(timeout=10)
