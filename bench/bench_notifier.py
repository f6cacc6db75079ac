"""Benchmark: publish-to-WebSocket latency of the notifier (a script, not a test).

Starts its own nats-server (JetStream, temporary store) and a notifier process, connects one WebSocket client
per job to ``/api/v1/ws/jobs/<job_id>``, publishes ``EpochCompleted`` events for every job at ``--rate`` per
second for ``--duration`` seconds, and prints the latency from the event's creation (just before
``js.publish``) to its arrival at the client, plus delivery checks (lost, duplicated, out of order).

    .venv/bin/python bench/bench_notifier.py                      # 100 jobs x 10 events/s, 100 clients, 10 s
    .venv/bin/python bench/bench_notifier.py --jobs 20 --duration 5
    .venv/bin/python bench/bench_notifier.py --clients 1000       # 100 jobs, 10 clients watching each
    .venv/bin/python bench/bench_notifier.py --jobs 1 --clients 1000   # 1,000 clients watching one job

``--clients`` spreads the clients over the jobs round-robin (default: one per job); the notifier serves all the
clients of one job from one shared live consumer per stream (each client replays with its own consumer first).
The clients all run in this one process: with 1,000 of them, its own CPU is part of the measured latency (see the
CPU line).

``--auth on`` (default) runs the notifier as deployed: each client connects with a signed ticket (minted here with a
key pair made for the run, as the API would); ``--auth off`` runs it without tickets; ``--auth both`` runs a notifier
of each kind side by side on the same events (each with its own clients, so the machine's noise hits both alike)
and prints the ratio of their p99s. The bench's CPU line then counts both sets of clients.
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
import time
from datetime import datetime
from pathlib import Path

import httpx
import nats
import websockets
from kiln_contracts import EpochCompleted, Event, tickets
from kiln_contracts.streams import ensure_streams

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from kiln_testing import NatsServer, free_port  # noqa: E402


PROJECT = "bench"
PRIVATE_KEY, PUBLIC_KEY = tickets.generate_keypair()


def start_notifier(nats_url: str, port: int, auth: str, store: Path) -> subprocess.Popen[bytes]:
    """The notifier in its own process, as deployed (so the bench's clients do not share its event loop)."""
    env = os.environ | {
        "KILN_NOTIFIER_NATS_URL": nats_url, "KILN_NOTIFIER_PORT": str(port), "KILN_NOTIFIER_LOG_LEVEL": "WARNING",
        "KILN_NOTIFIER_AUTH": "tickets" if auth == "on" else "off",
    }
    if auth == "on":
        (store / "ticket.pub").write_bytes(PUBLIC_KEY)
        env["KILN_NOTIFIER_TICKET_PUBLIC_KEY_FILE"] = str(store / "ticket.pub")
    return subprocess.Popen([sys.executable, "-c", "from kiln_notifier.main import main; main()"], env=env)


async def wait_healthy(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            try:
                if (await client.get(f"http://127.0.0.1:{port}/healthz")).json().get("nats"):
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("notifier did not become healthy")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), to report what the notifier itself cost."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Client:
    """One WebSocket client watching one job; records latencies and sequence anomalies."""

    def __init__(self, job_id: str, auth: bool) -> None:
        self.job_id, self.auth = job_id, auth
        self.latencies: list[tuple[float, float]] = []  # (sent at, latency)
        self.seen: set[str] = set()
        self.duplicates = self.out_of_order = self.last_seq = self.resumes = 0
        self.ready = asyncio.Event()

    async def run(self, port: int, stop: asyncio.Event) -> None:
        """Read until ``stop``; like a real client, resume with its cursor when the notifier cuts it off."""
        cursor: dict[str, int] = {}
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                query = "&".join(f"after_{k}={v}" for k, v in sorted(cursor.items()))
                url = f"ws://127.0.0.1:{port}/api/v1/ws/jobs/{self.job_id}" + (f"?{query}" if query else "")
                protocols = None
                if self.auth:  # a fresh ticket per connection, as a browser gets one from the API
                    t = tickets.issue(tickets.Ticket(sub="bench", key="bench", jobs={self.job_id: PROJECT}), PRIVATE_KEY)
                    protocols = ["kiln.v1", f"kiln.ticket.{t}"]
                try:
                    async with websockets.connect(url, proxy=None, open_timeout=30, max_queue=None,
                                                  subprotocols=protocols) as ws:
                        # One plain ``async for`` per connection: a timer per message (wait_for) cost the
                        # bench's clients, which share the cores with the notifier, a good part of their CPU.
                        reader = asyncio.create_task(self._read(ws, cursor))
                        await asyncio.wait({reader, stopping}, return_when=asyncio.FIRST_COMPLETED)
                        if stop.is_set():
                            reader.cancel()
                            return
                        reader.result()  # closed by the notifier
                except (websockets.ConnectionClosed, OSError, asyncio.TimeoutError):
                    pass
                self.resumes += 1
                await asyncio.sleep(0.2)
        finally:
            stopping.cancel()

    async def _read(self, ws, cursor: dict[str, int]) -> None:  # type: ignore[no-untyped-def]
        async for raw in ws:
            now = time.time()
            msg = json.loads(raw)
            if msg["type"] == "subscribed":
                self.ready.set()
            if msg["type"] != "event":
                continue
            cursor[msg["stream"]] = msg["seq"]
            sent = datetime.fromisoformat(msg["event"]["time"]).timestamp()
            self.latencies.append((sent, now - sent))
            self.duplicates += msg["event"]["id"] in self.seen
            self.seen.add(msg["event"]["id"])
            self.out_of_order += msg["seq"] <= self.last_seq
            self.last_seq = msg["seq"]


async def publish(js, job_id: str, rate: float, until: float, offset: float) -> int:
    """Publish ``rate`` events/s for one job until ``until`` (monotonic); returns how many were published."""
    await asyncio.sleep(offset)  # spread the jobs over the period instead of publishing in lockstep
    n, period, start = 0, 1.0 / rate, time.monotonic()
    while time.monotonic() < until:
        n += 1
        ev = Event.new(job_id=job_id, project=PROJECT, attempt=1, seq=n, source="trainer",
                       data=EpochCompleted(epoch=n, epochs=10**6, metrics={"metrics/mAP50(B)": 0.5, "fitness": 0.4}))
        await js.publish(ev.subject, ev.to_bytes(), headers=ev.headers())
        await asyncio.sleep(max(0.0, start + n * period - time.monotonic()))
    return n


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1] if len(values) > 1 else values[0]


async def bench(args: argparse.Namespace, modes: tuple[str, ...]) -> dict[str, float | None]:
    """One nats-server and one notifier per mode, run side by side on the same published events: with ``both``
    the notifier with tickets and the one without share the machine's noise alike."""
    with tempfile.TemporaryDirectory() as store:
        server = NatsServer(Path(store))
        server.start()
        ports = {mode: free_port() for mode in modes}
        notifiers = {mode: start_notifier(server.url, ports[mode], mode, Path(store)) for mode in modes}
        try:
            for port in ports.values():
                await wait_healthy(port)
            nc = await nats.connect(server.url)
            js = nc.jetstream()
            await ensure_streams(js)
            jobs = [f"bench-{i:04d}-{os.urandom(3).hex()}" for i in range(args.jobs)]
            clients = {mode: [Client(jobs[i % len(jobs)], mode == "on") for i in range(args.clients or args.jobs)]
                       for mode in modes}
            stop = asyncio.Event()
            tasks = []
            everyone = [(mode, c) for i in range(args.clients or args.jobs) for mode in modes
                        for c in [clients[mode][i]]]
            for n, (mode, c) in enumerate(everyone, 1):  # small waves: a thousand handshakes at once time out
                tasks.append(asyncio.create_task(c.run(ports[mode], stop)))
                if n % 50 == 0:
                    await asyncio.wait_for(asyncio.gather(*(c.ready.wait() for _, c in everyone[:n])), 120)
            await asyncio.wait_for(asyncio.gather(*(c.ready.wait() for _, c in everyone)), 120)
            cpu0 = {m: cpu_seconds(p.pid) for m, p in notifiers.items()}
            t0, wall0 = time.monotonic(), time.time()
            own0 = cpu_seconds(os.getpid())
            until = t0 + args.duration
            counts = await asyncio.gather(*(publish(js, job, args.rate, until, i / args.jobs / args.rate)
                                            for i, job in enumerate(jobs)))
            await asyncio.sleep(args.drain)
            cpu = {m: cpu_seconds(p.pid) - cpu0[m] for m, p in notifiers.items()}
            own = cpu_seconds(os.getpid()) - own0
            elapsed = time.monotonic() - t0
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await nc.close()
        finally:
            for p in notifiers.values():
                p.terminate()
                p.wait(15)
            server.stop()
    per_job = dict(zip(jobs, counts, strict=True))
    out = {}
    for mode in modes:
        expected = sum(per_job[c.job_id] for c in clients[mode])
        out[mode] = report(args, mode, clients[mode], sum(counts), expected, cpu[mode], own, elapsed, wall0)
    return out


def report(
    args: argparse.Namespace, auth: str, clients: list[Client], published: int, expected: int, cpu: float,
    own: float, elapsed: float, wall0: float,
) -> float | None:
    # Events of the first --warmup seconds count for delivery, not for latency (connections and caches warming up).
    lat = sorted(x for c in clients for sent, x in c.latencies if sent >= wall0 + args.warmup)
    received = sum(len(c.seen) for c in clients)
    print(f"auth={auth} jobs={args.jobs} clients={len(clients)} rate={args.rate}/s/job duration={args.duration}s")
    print(f"published={published} expected deliveries={expected} received={received} lost={expected - received} "
          f"duplicates={sum(c.duplicates for c in clients)} out_of_order={sum(c.out_of_order for c in clients)} "
          f"resumes={sum(c.resumes for c in clients)}")
    if lat:
        ms = [x * 1000 for x in lat]
        print(f"latency ms ({len(ms)} events after {args.warmup:g}s warm-up): p50={pct(ms, 50):.2f} p90={pct(ms, 90):.2f} p99={pct(ms, 99):.2f} max={ms[-1]:.2f}")
    print(f"notifier CPU: {cpu:.2f}s over {elapsed:.1f}s ({100 * cpu / elapsed:.0f}% of one core), "
          f"{published / args.duration:.0f} events/s in, {expected / args.duration:.0f} messages/s out; "
          f"bench clients' CPU: {own:.2f}s ({100 * own / elapsed:.0f}% of one core)")
    return pct([x * 1000 for x in lat], 99) if lat else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100, help="jobs, one WebSocket client each")
    parser.add_argument("--clients", type=int, default=0, help="WebSocket clients, spread over the jobs "
                        "(default: one per job)")
    parser.add_argument("--rate", type=float, default=10.0, help="events per second per job")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of publishing")
    parser.add_argument("--warmup", type=float, default=1.0, help="first seconds left out of the latency figures")
    parser.add_argument("--drain", type=float, default=2.0, help="seconds to wait for the last events")
    parser.add_argument("--auth", choices=("on", "off", "both"), default="on",
                        help="tickets required (on, as deployed), none (off), or off then on in one run (both)")
    args = parser.parse_args()
    p99 = asyncio.run(bench(args, ("off", "on") if args.auth == "both" else (args.auth,)))
    if args.auth == "both" and p99["off"] and p99["on"]:
        print(f"p99 with tickets / without: {p99['on'] / p99['off']:.2f}")


if __name__ == "__main__":
    main()
