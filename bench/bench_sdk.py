"""What the trainer SDK costs a training loop, and how much it can carry.

    .venv/bin/python bench/bench_sdk.py [latency] [throughput] [yolo] [--calls 100000] [--events 100000]
        [--repeat 3] [--pairs 6] [--epochs 8] [--imgsz 96] [--images 64] [--torch-threads 0]
        [--layout sequential|pinned] [--aa]

1. ``latency``: the cost of one ``run.log_metrics(step, <10 metrics>)`` on the calling (training) thread, with the
   real :class:`kiln_sdk.NatsReporter` connected to a real nats-server started here, measured per call with
   ``perf_counter_ns``, as a burst (back to back) and paced (one call every 100 us or 1 ms of busy work, as a
   training loop would call it, though rarely that often).  The same loop with a :class:`kiln_sdk.NullReporter`
   and with a bare ``dict(...)`` copy gives the floor in the same process.
2. ``throughput``: sustained events/s from this process into JetStream with acks: the producer submits as fast
   as the SDK keeps up (backing off only when the queue is 90% full, so nothing coalesces), the count is the
   stream's message count on the server; each round also measures nats-py alone (``publish_async`` of events
   serialized beforehand) as the baseline of that moment.
3. ``yolo``: a real tiny YOLO training (detection, CPU, 10-20 s) with the Kiln integration on (callbacks and a
   ``NatsReporter`` publishing to the server, default settings) and off, same seed, ``pairs`` times after a
   warm-up.  ``--layout sequential``: on and off alternate in one process (separate processes add their own
   +-10% to each run).  ``--layout pinned``: two processes run at the same time, each pinned to one core with one
   torch thread, one on and one off, swapping roles every pair (the nats-server is pinned to the "on" core): the
   worst case for Kiln's threads, which get no spare core.  ``--aa`` makes both sides "off": the ratios the
   machine produces by itself.  Reports the ratio of the ``model.train()`` wall and CPU times (per pair, median,
   geometric mean with a 95% bootstrap interval, best-of-N), the time inside Kiln's callbacks, and the counted
   cost: callbacks + the CPU of Kiln's threads + the server's extra CPU, over the "off" wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import nats  # noqa: E402

from kiln_contracts import streams  # noqa: E402
from kiln_sdk import JobContext, NatsReporter, NullReporter, Run  # noqa: E402
from kiln_testing import NatsServer  # noqa: E402

METRICS = {f"train/metric_{i}": 0.1 * i for i in range(10)}


async def _ensure(url: str) -> None:
    nc = await nats.connect(url)
    try:
        await streams.ensure_streams(nc.jetstream())
    finally:
        await nc.close()


async def _stream_count(url: str, stream: str = "KILN_EVENTS") -> int:
    nc = await nats.connect(url)
    try:
        return int((await nc.jetstream().stream_info(stream)).state.messages)
    finally:
        await nc.close()


def _run(url: str | None, tmp: Path, reporter: str = "nats", **options: object) -> Run:
    job = f"bench-{uuid.uuid4().hex[:8]}"
    ctx = JobContext(job_id=job, project="bench", nats_url=url, job_dir=tmp, spool_dir=tmp / job / "spool")
    rep = NatsReporter(url, job, "bench", 1, ctx.spool_dir, **options) if reporter == "nats" else NullReporter()
    return Run(ctx, rep)


def _pct(samples: list[int], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))] / 1000.0  # ns -> us


def _busy(us: float) -> None:
    end = time.perf_counter_ns() + int(us * 1000)
    while time.perf_counter_ns() < end:
        pass


def _time_calls(fn, calls: int, pace_us: float) -> list[int]:  # type: ignore[no-untyped-def]
    clock = time.perf_counter_ns
    out = [0] * calls
    for i in range(calls):
        t0 = clock()
        fn(i)
        out[i] = clock() - t0
        if pace_us:
            _busy(pace_us)
    return out


def _line(name: str, samples: list[int], base: list[int] | None = None) -> str:
    p50, p99, p999 = _pct(samples, 0.5), _pct(samples, 0.99), _pct(samples, 0.999)
    ratio = f"  (p50 {p50 / _pct(base, 0.5):.1f}x the floor)" if base else ""
    worst = max(samples) / 1000
    return f"  {name:<34} p50 {p50:6.2f} us  p99 {p99:6.2f} us  p99.9 {p999:7.2f} us  max {worst:8.1f} us{ratio}"


def bench_latency(url: str, tmp: Path, calls: int) -> dict[str, float]:
    print(f"1. log_metrics(step, {len(METRICS)} metrics) on the training thread, {calls:,} calls per series")
    results: dict[str, float] = {}
    for pace in (0.0, 100.0, 1000.0):
        n = calls if not pace else min(calls, 20_000 if pace < 1000 else 5_000)
        label = "burst" if not pace else f"paced {pace:.0f} us"
        floor = _time_calls(lambda i: dict(METRICS), n, pace)
        null = _run(None, tmp, reporter="null")
        null_s = _time_calls(lambda i, r=null: r.log_metrics(i, METRICS), n, pace)
        run = _run(url, tmp)
        time.sleep(0.5)  # connected
        real = _time_calls(lambda i, r=run: r.log_metrics(i, METRICS), n, pace)
        ok = run.finish(timeout=60)
        stats = run.reporter.stats
        print(f" {label}:")
        print(_line("dict(metrics) copy (floor)", floor))
        print(_line("Run + NullReporter", null_s, floor))
        print(_line("Run + NatsReporter (connected)", real, floor))
        print(f"  delivered {stats['delivered']:,}, coalesced {stats['coalesced']:,}, spooled {stats['spooled']}, "
              f"all acked: {ok}")
        results[f"{label} p50_us"] = _pct(real, 0.5)
        results[f"{label} p99_us"] = _pct(real, 0.99)
    return results


async def _raw_baseline(url: str, events: int) -> float:
    """nats-py alone: pre-serialized events, publish_async with 4,000 in flight, counted on the server."""
    from kiln_sdk._events import EventFactory

    f = EventFactory(f"raw-{uuid.uuid4().hex[:8]}", "bench")
    msgs = f.serialize_many([("metrics", time.time(), {"step": i, "metrics": METRICS}) for i in range(events)])
    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=4000)
    before = (await js.stream_info("KILN_EVENTS")).state.messages
    t0 = time.perf_counter()
    for subject, payload, msg_id in msgs:
        await js.publish_async(subject, payload, headers={"Nats-Msg-Id": msg_id})
    await js.publish_async_completed()
    dt = time.perf_counter() - t0
    stored = (await js.stream_info("KILN_EVENTS")).state.messages - before
    await nc.close()
    return stored / dt


def _sdk_throughput(url: str, tmp: Path, events: int) -> tuple[float, str]:
    before = asyncio.run(_stream_count(url))
    run = _run(url, tmp)
    rep = run.reporter
    assert isinstance(rep, NatsReporter)
    time.sleep(0.5)
    high = int(rep._q.maxsize * 0.9)  # noqa: SLF001 - back off before coalescing would start
    t0 = time.perf_counter()
    waits = 0
    for i in range(events):
        while len(rep._q) >= high:  # noqa: SLF001
            waits += 1
            time.sleep(0.0005)
        run.log_metrics(i, METRICS)
    t_sub = time.perf_counter()
    ok = run.flush(timeout=120)
    t_end = time.perf_counter()
    stored = asyncio.run(_stream_count(url)) - before
    run.finish(timeout=10)
    rate = stored / (t_end - t0)
    return rate, (f"submitted in {t_sub - t0:.2f}s ({waits:,} back-off sleeps), all acked after {t_end - t0:.2f}s: "
                  f"{stored:,} stored (flush ok: {ok}, coalesced {rep.stats['coalesced']})")


def bench_throughput(url: str, tmp: Path, events: int, repeat: int) -> float:
    print(f"2. sustained events/s into JetStream with acks ({events:,} MetricsLogged of {len(METRICS)} metrics, "
          f"{repeat} rounds, each against the baseline of that round)")
    rates, ratios = [], []
    for r in range(repeat):
        raw = asyncio.run(_raw_baseline(url, events))
        rate, detail = _sdk_throughput(url, tmp, events)
        rates.append(rate)
        ratios.append(rate / raw)
        print(f"  round {r + 1}: nats-py alone (serialized beforehand, publish_async, 4,000 in flight) "
              f"{raw:,.0f}/s; SDK {rate:,.0f}/s ({rate / raw:.2f}x); {detail}")
    print(f"  SDK median {statistics.median(rates):,.0f} events/s, {statistics.median(ratios):.2f}x the baseline")
    return statistics.median(rates)


YOLO_CHILD = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    job = Path(sys.argv[1]); data = sys.argv[2]; epochs = int(sys.argv[3]); imgsz = int(sys.argv[4])
    torch_threads = int(sys.argv[5]); server_pid = int(sys.argv[6])
    os.environ.update(YOLO_OFFLINE="1", YOLO_AUTOINSTALL="0", YOLO_CONFIG_DIR=str(job / "yolo-config"))
    os.environ.pop("PYTEST_CURRENT_TEST", None)
    from kiln_trainer_ultralytics import environment
    environment.prepare(job)
    from ultralytics import YOLO
    environment.switch_off_integrations()
    import torch
    import kiln_sdk
    from kiln_sdk.integrations import ultralytics as kiln_ul
    if torch_threads:
        torch.set_num_threads(torch_threads)

    def kiln_threads_cpu():  # ns-exact CPU time of each Kiln thread (schedstat; stat's ticks are 10 ms)
        import threading
        out = {}
        for t in threading.enumerate():
            if t.name.startswith("kiln-sdk-"):
                try:
                    out[t.name[9:]] = int(open(f"/proc/self/task/{t.native_id}/schedstat").read().split()[0]) / 1e9
                except OSError:
                    pass
        return out

    def server_cpu():  # the bench's nats-server, all its threads (ticks)
        f = open(f"/proc/{server_pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

    def train(kiln, name):
        model = YOLO("yolov8n.yaml")
        spent = [0.0]
        run = None
        if kiln:
            run = kiln_sdk.init()  # a new run (and publisher) each time: the previous one finished

            def timed(fn):
                def hook(trainer):
                    t = time.perf_counter()
                    try:
                        fn(trainer)
                    finally:
                        spent[0] += time.perf_counter() - t
                return hook

            for event, fn in kiln_ul.callbacks.items():
                model.add_callback(event, timed(fn))
        t0, c0, s0 = time.perf_counter(), time.process_time(), server_cpu()
        model.train(data=data, epochs=epochs, imgsz=imgsz, batch=8, nbs=8, warmup_epochs=0, workers=0,
                    plots=False, seed=0, deterministic=True, device="cpu", project=str(job), name=name,
                    exist_ok=True, verbose=False, val=True)
        t_train, cpu = time.perf_counter() - t0, time.process_time() - c0  # cpu: every thread of the process
        threads, server = kiln_threads_cpu(), server_cpu() - s0
        ok = run.finish(timeout=60) if kiln else True
        stats = run.reporter.stats if kiln else {}
        return {"mode": "on" if kiln else "off", "train_s": t_train, "cpu_s": cpu, "acked": ok,
                "delivered": stats.get("delivered", 0), "in_callbacks_s": spent[0], "threads_cpu_s": threads,
                "server_cpu_s": server}

    print("ready", flush=True)
    for n, line in enumerate(sys.stdin):  # one command per line: warmup | on | off
        mode = line.strip()
        result = train(mode == "on", f"r{n}-{mode}")
        print(json.dumps({**result, "mode": mode}), flush=True)
""")


def _ms(cpu: dict[str, float]) -> str:
    return ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in cpu.items()) or "-"


def _geomean_ci(ratios: list[float], rounds: int = 10_000) -> tuple[float, float, float]:
    """Geometric mean of per-pair ratios and its 95% percentile-bootstrap interval (seeded: reproducible)."""
    import math
    import random

    logs = [math.log(r) for r in ratios]
    rng = random.Random(0)
    means = sorted(statistics.fmean(rng.choices(logs, k=len(logs))) for _ in range(rounds))
    return (math.exp(statistics.fmean(logs)), math.exp(means[int(0.025 * rounds)]),
            math.exp(means[int(0.975 * rounds) - 1]))


class _Trainer:
    """One training child process (see ``YOLO_CHILD``), optionally pinned to one core; trains on command."""

    def __init__(self, tag: str, url: str, tmp: Path, data: Path, a: argparse.Namespace, server_pid: int,
                 core: int | None) -> None:
        self.job = tmp / f"yolo-{tag}"
        self.job.mkdir()
        self.core = core
        env = {**os.environ, "KILN_JOB_ID": f"bench-yolo-{tag}", "KILN_PROJECT": "bench", "KILN_NATS_URL": url,
               "KILN_JOB_DIR": str(self.job)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", YOLO_CHILD, str(self.job), str(data), str(a.epochs), str(a.imgsz),
             str(a.torch_threads), str(server_pid)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=(self.job / "stderr.log").open("w"), text=True, cwd=self.job,
            preexec_fn=None if core is None else (lambda: os.sched_setaffinity(0, {core})))
        self._read()  # "ready"

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("ready"):
                return {}
            if line.startswith('{"'):
                return json.loads(line)
        raise SystemExit(f"training failed:\n{(self.job / 'stderr.log').read_text()[-3000:]}")

    def send(self, mode: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(mode + "\n")
        self.proc.stdin.flush()

    def result(self) -> dict:
        return self._read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(60)


def _pin_all_threads(pid: int, core: int) -> None:
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {core})
        except OSError:
            pass


def bench_yolo(url: str, tmp: Path, a: argparse.Namespace, server_pid: int) -> float:
    from kiln_local.synth import make_detection_dataset

    pinned = a.layout == "pinned"
    if pinned and a.torch_threads != 1:
        a.torch_threads = 1  # one core each: one torch thread each
    threads = f"{a.torch_threads} torch thread(s)" if a.torch_threads else "torch's default threads"
    if a.aa:
        print("   A/A run: both sides of every pair are 'off' (what on/off ratios this machine gives by itself)")
    how = ("two processes at the same time, each pinned to its own core, one on and one off (roles swap every "
           "pair; nats-server pinned to the 'on' core)" if pinned else "on and off alternated in one process")
    print(f"3. tiny YOLO training (yolov8n from YAML, imgsz {a.imgsz}, {a.images}+8 synthetic images, {a.epochs} "
          f"epochs, batch 8, CPU, {threads}, seed 0), integration on vs off: {how}; {a.pairs} pairs after a warm-up")
    res: dict[str, list[dict]] = {"on": [], "off": []}
    wall, cpu = [], []

    def show(n: int, r: dict, where: str = "") -> None:
        extra = (f", {r['in_callbacks_s'] * 1000:.1f} ms in Kiln callbacks, {r['delivered']} events acked: "
                 f"{r['acked']}, CPU of Kiln threads {_ms(r['threads_cpu_s'])}, nats-server "
                 f"{r['server_cpu_s'] * 1000:.0f} ms") if r["mode"] == "on" else ""
        print(f"  pair {n} {r['mode']:>3}{where}: train {r['train_s']:.2f}s wall, {r['cpu_s']:.2f}s CPU{extra}")

    def record(n: int, on: dict, off: dict) -> None:
        res["on"].append(on)
        res["off"].append(off)
        wall.append(on["train_s"] / off["train_s"])
        cpu.append(on["cpu_s"] / off["cpu_s"])

    if pinned:
        cores = sorted(os.sched_getaffinity(0))[:2]
        if len(cores) < 2:
            raise SystemExit("--layout pinned needs two cores")
        kids = []
        for k, core in enumerate(cores):
            data = make_detection_dataset(tmp / f"data{k}", n_train=a.images, n_val=8, imgsz=a.imgsz)
            kids.append(_Trainer(f"core{core}", url, tmp, data, a, server_pid, core))
        try:
            for kid in kids:  # warm-up at the same time, as the pairs run
                kid.send("warmup")
            for kid in kids:
                kid.result()
            for p in range(a.pairs):
                on_kid, off_kid = (kids[p % 2], kids[1 - p % 2])
                _pin_all_threads(server_pid, on_kid.core or 0)
                on_kid.send("off" if a.aa else "on")
                off_kid.send("off")
                on, off = on_kid.result(), off_kid.result()
                show(p + 1, on, f" (core {on_kid.core})")
                show(p + 1, off, f" (core {off_kid.core})")
                record(p + 1, on, off)
        finally:
            for kid in kids:
                kid.close()
    else:
        data = make_detection_dataset(tmp / "data", n_train=a.images, n_val=8, imgsz=a.imgsz)
        kid = _Trainer("seq", url, tmp, data, a, server_pid, None)
        try:
            kid.send("warmup")  # label caches, page cache, torch's first-call costs
            kid.result()
            for p in range(a.pairs):
                got = {}
                for slot in (("on", "off") if p % 2 == 0 else ("off", "on")):  # alternate which goes first
                    kid.send("off" if a.aa else slot)
                    got[slot] = kid.result()
                    show(p + 1, got[slot])
                record(p + 1, got["on"], got["off"])
        finally:
            kid.close()
    best = {m: min(r["train_s"] for r in res[m]) for m in res}  # "on"/"off" are the pair's slots
    print(f"  wall on/off per pair: {', '.join(f'{r:.3f}' for r in wall)}; median {statistics.median(wall):.3f}; "
          f"best-of-{len(wall)} on/off {best['on'] / best['off']:.3f} ({best['on']:.2f}s vs {best['off']:.2f}s)")
    gm, lo, hi = _geomean_ci(wall)
    verdict = ("too few pairs for an interval (8 or more)" if len(wall) < 8 else "met" if hi < 1.02
               else "not met" if lo >= 1.02 else "not resolved: the interval spans 1.02")
    print(f"  wall on/off geometric mean {gm:.3f}, 95% bootstrap interval {lo:.3f}-{hi:.3f} "
          f"(target < 1.02: {verdict})")
    print(f"  CPU on/off per pair: {', '.join(f'{r:.3f}' for r in cpu)}; median {statistics.median(cpu):.3f}")
    share = [r["in_callbacks_s"] / r["train_s"] for r in res["on"]]
    print(f"  time inside the Kiln callbacks on the training thread: {statistics.median(share):.2%} of train() "
          f"(median; max {max(share):.2%}); every event acked: {all(r['acked'] for r in res['on'])}")
    # What Kiln adds, counted rather than timed: the callbacks (training thread), the CPU of its own threads and
    # the server's extra CPU for its events.  Where training keeps every core busy each of these can displace
    # training about 1:1, so their sum over the "off" time estimates the slowdown without the noise of comparing
    # two wall times.
    off_server = statistics.median(r["server_cpu_s"] for r in res["off"])
    added = [(r["in_callbacks_s"] + sum(r["threads_cpu_s"].values()) + max(r["server_cpu_s"] - off_server, 0.0))
             / o["train_s"] for r, o in zip(res["on"], res["off"])]
    print(f"  counted cost (callbacks + Kiln threads' CPU + nats-server's extra CPU) / off wall time: median "
          f"{statistics.median(added):.2%}, max {max(added):.2%}")
    return gm


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("parts", nargs="*", default=["latency", "throughput", "yolo"])
    p.add_argument("--calls", type=int, default=100_000)
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--imgsz", type=int, default=96)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads in the YOLO runs (0: default)")
    p.add_argument("--aa", action="store_true", help="YOLO: both sides 'off' (the noise floor of the comparison)")
    p.add_argument("--layout", choices=["sequential", "pinned"], default="sequential",
                   help="YOLO on/off: alternated in one process, or two pinned processes at the same time")
    a = p.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress shows when piped, too
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        server = NatsServer(tmp / "nats")
        server.start()
        try:
            asyncio.run(_ensure(server.url))
            if "latency" in a.parts:
                bench_latency(server.url, tmp, a.calls)
            if "throughput" in a.parts:
                bench_throughput(server.url, tmp, a.events, a.repeat)
            if "yolo" in a.parts:
                assert server.proc is not None
                bench_yolo(server.url, tmp, a, server.proc.pid)
        finally:
            server.stop()
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
