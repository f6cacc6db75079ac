"""Kiln across hosts (issue 13), for real on one machine: every part in a network namespace of its own, with its
own address on one bridge (kiln_testing.hosts): 3 nats-server nodes clustered with JetStream (operator-mode JWT
identities from one trust chain, streams provisioned with 3 replicas), PostgreSQL, the API, 2 metrics-writers,
2 notifiers and 3 runners, each service on its own creds and given all three NATS URLs.

A real tiny YOLO job runs while the test cuts the runner host that trains it off the network (its trainer stops by
itself once its claim lapses; a reaper retries the attempt on another runner), then kills the NATS node leading
KILN_EVENTS (SIGKILL, brought back), one writer and one notifier.  The job completes; every event is in PostgreSQL
exactly once; two WebSocket clients (one on the killed notifier, which resumes on the other with its cursors) see
every event once, in stream order.  The figures are printed and recorded in docs/deploy.md.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import nats
import pytest
import websockets

from kiln_contracts import Event, tickets
from kiln_contracts.natsauth.client import servers
from kiln_contracts.natsauth.provision import provision
from kiln_contracts.natsauth.server import Cluster, write_server_config
from kiln_local.bus import PROVISIONER, Identities
from kiln_local.stack import nats_server_bin
from kiln_local.synth import make_detection_dataset
from kiln_testing.hosts import Host, Network, Postgres, unavailable, wait_listening
from kiln_testing.natsauth import observer_options
from kiln_testing.notifier import authorized, ws_connect
from kiln_testing.runners import pid_alive

WHY_NOT = unavailable() or (None if list(Path("/usr/lib/postgresql").glob("*/bin/postgres")) else
                            "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(900),
              pytest.mark.skipif(WHY_NOT is not None, reason=f"multi-host test needs network namespaces: {WHY_NOT}")]

TRAIN = {"epochs": 4, "imgsz": 64, "batch": 8, "nbs": 8, "workers": 0, "warmup_epochs": 0, "seed": 0}
NODES = ("nats-1", "nats-2", "nats-3")
RUNNERS = ("runner-1", "runner-2", "runner-3")
RETRY_BOUND_S = 50.0  # docs/operations.md, "Failure behaviour": a lost runner's attempt is retried within 25-50 s
STORED = {"status": "status_events", "finished": "status_events", "epoch": "metric_events",
          "metrics": "metric_events", "artifact": "artifacts", "log": "logs"}  # kinds the writer keeps, and where


@dataclass
class Kiln:
    """The deployment: one host per part; every process's log in ``root/logs``."""

    net: Network
    root: Path
    pg: Postgres
    bus: Identities
    dataset: Path
    db_url: str = ""
    started: float = field(default_factory=time.monotonic)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def host(self, name: str) -> Host:
        return self.net.hosts[name]

    @property
    def nats_url(self) -> str:
        return ",".join(self.host(n).url("nats", 4222) for n in NODES)

    @property
    def api_url(self) -> str:
        return self.host("api").url("http", 8000)

    def notifier(self, name: str) -> str:
        return f"{self.host(name).address}:8001"

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def tail(self, *names: str) -> str:
        return "\n".join(f"--- {n}\n{self.log(n).read_text(errors='replace')[-2500:]}" for n in names)

    def start_nats(self, name: str) -> None:
        self.procs[name] = self.host(name).popen([nats_server_bin(), "-c", str(self.root / name / "nats.conf")],
                                                 log=self.log(name))

    def start(self, name: str) -> None:
        module, env = self._service(name)
        self.procs[name] = self.host(name).popen([sys.executable, "-m", module], log=self.log(name), cwd=self.root,
                                                 env={**os.environ, "PYTHONUNBUFFERED": "1", **env})

    def kill(self, name: str) -> None:
        self.procs[name].kill()
        self.procs[name].wait(10)

    def _service(self, name: str) -> tuple[str, dict[str, str]]:
        """What ``kiln up`` would give the service (deploy/local: stack.py), on this host's address."""
        address, secrets, bus = self.host(name).address, self.root / "secrets", self.bus
        if name == "api":
            return "kiln_api", {
                "KILN_API_NATS_URL": self.nats_url, "KILN_API_DATABASE_URL": self.db_url, "KILN_API_HOST": address,
                "KILN_API_PORT": "8000", "KILN_API_NOTIFIER_URL": f"ws://{self.notifier('notifier-1')}",
                "KILN_API_BOOTSTRAP_KEY_FILE": str(secrets / "owner.key"),
                "KILN_API_TICKET_PRIVATE_KEY_FILE": str(secrets / "ticket-signing.pem"), **bus.api_env()}
        if name.startswith("writer"):
            return "kiln_metrics_writer", {"KILN_WRITER_NATS_URL": self.nats_url,
                                           "KILN_WRITER_DATABASE_URL": self.db_url,
                                           **bus.env("KILN_WRITER", "metrics-writer")}
        if name.startswith("notifier"):
            return "kiln_notifier", {
                "KILN_NOTIFIER_NATS_URL": self.nats_url, "KILN_NOTIFIER_HOST": address, "KILN_NOTIFIER_PORT": "8001",
                "KILN_NOTIFIER_TICKET_PUBLIC_KEY_FILE": str(secrets / "ticket-signing.pub"),
                "KILN_NOTIFIER_ALLOWED_ORIGINS": self.api_url, **bus.env("KILN_NOTIFIER", "notifier")}
        return "kiln_runner", {
            "KILN_RUNNER_NATS_URL": self.nats_url, "KILN_RUNNER_POOL": "default", **bus.runner_env("default"),
            "KILN_RUNNER_SLOTS": "1", "KILN_RUNNER_WORK_DIR": str(self.root / name), "KILN_RUNNER_RUNNER_ID": name,
            "KILN_RUNNER_DATA_ROOTS": str(self.dataset.parent),
            # A folder every runner host mounts (NFS, say): a retry elsewhere can resume from a stored checkpoint.
            "KILN_RUNNER_ARTIFACT_DIR": str(self.root / "artifacts")}

    def ready(self, name: str, timeout: float = 120.0) -> None:
        proc, deadline = self.procs[name], time.monotonic() + timeout
        if name == "api" or name.startswith("notifier"):  # uvicorn listens once the app has started
            wait_listening(self.host(name).address, 8000 if name == "api" else 8001, timeout, proc, self.log(name))
            return
        marker = b"up: pool" if name.startswith("runner") else b"consuming KILN_EVENTS"
        while marker not in self.log(name).read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, self.tail(name)
            time.sleep(0.1)


def deploy(k: Kiln) -> None:
    """Trust chain, NATS cluster, PostgreSQL, schema, provisioning with 3 replicas, then every service."""
    (k.root / "logs").mkdir(parents=True)
    secrets = k.root / "secrets"
    secrets.mkdir(mode=0o700)
    private, public = tickets.generate_keypair()
    (secrets / "ticket-signing.pem").write_bytes(private)
    (secrets / "ticket-signing.pub").write_bytes(public)
    routes = tuple(f"{k.host(n).address}:6222" for n in NODES)
    for n in NODES:
        address = k.host(n).address
        write_server_config(k.bus.chain, k.root / n / "nats.conf", port=4222, host=address, server_name=n,
                            store_dir=k.root / n / "js", resolver_dir=k.root / n / "resolver", monitor_port=8222,
                            cluster=Cluster("kiln", 6222, routes, host=address))
        k.start_nats(n)
    k.pg.start()
    k.db_url = asyncio.run(k.pg.create_database("kiln"))
    subprocess.run([sys.executable, "-m", "kiln_store", "upgrade"], check=True, cwd=k.root, capture_output=True,
                   env={**os.environ, "KILN_DATABASE_URL": k.db_url})
    for n in NODES:
        wait_listening(k.host(n).address, 4222, 20, k.procs[n], k.log(n))
    asyncio.run(_provision(k))
    names = ["api", "writer-1", "writer-2", "notifier-1", "notifier-2", *RUNNERS]
    for name in names:
        k.start(name)
    for name in names:
        k.ready(name)


async def _provision(k: Kiln) -> None:
    nc = await nats.connect(servers(k.nats_url), user_credentials=str(k.bus.creds(PROVISIONER.name)),
                            inbox_prefix=PROVISIONER.inbox, name="kiln-provision")
    deadline = time.monotonic() + 90
    try:
        while True:  # the meta leader is elected a few seconds after the routes come up
            try:
                await provision(nc.jetstream(timeout=5), ("default",), replicas=3)
                return
            except Exception:  # noqa: BLE001 - no meta leader yet, or not enough peers for three replicas
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1)
    finally:
        await nc.close()


@pytest.fixture()
def kiln(tmp_path: Path):
    started = time.monotonic()
    dataset = make_detection_dataset(tmp_path / "data" / "shapes", n_train=400, n_val=8, imgsz=64)
    with Network() as net:
        for name in ("pg", *NODES, "api", "writer-1", "writer-2", "notifier-1", "notifier-2", *RUNNERS):
            net.add(name)
        pg = Postgres(net.hosts["pg"], log=tmp_path / "pg.log")
        try:
            k = Kiln(net, tmp_path / "kiln", pg, Identities.bundled(tmp_path / "kiln" / "trust", ("default",)),
                     dataset, started=started)
            deploy(k)
            yield k
        finally:
            net.close()
            pg.remove()


def status_of(ev: Event) -> str | None:
    status = getattr(ev.data, "status", None)
    return status.value if status is not None else None


class Timeline:
    """The job's events as NATS core hands them to the test, with their arrival times: to wait on, not to count
    (a core subscription misses what is published while its own server is away)."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, Event]] = []

    async def start(self, nc: nats.NATS, job_id: str) -> Timeline:
        async def on(msg) -> None:  # type: ignore[no-untyped-def]
            self.seen.append((time.monotonic(), Event.model_validate_json(msg.data)))

        await nc.subscribe(f"kiln.evt.*.{job_id}.*", cb=on)
        return self

    async def wait(self, what: str, timeout: float, *, attempt: int, kind: str, status: str | None = None,
                   tail=None) -> tuple[float, Event]:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while True:
            for t, ev in self.seen:
                if ev.attempt == attempt and ev.data.kind == kind and (status is None or status_of(ev) == status):
                    return t, ev
            if time.monotonic() > deadline:
                seen = [(e.attempt, e.source, e.data.kind, status_of(e)) for _, e in self.seen
                        if e.data.kind != "progress"]
                raise AssertionError(f"no {what} within {timeout:.0f}s; seen {seen}\n{tail() if tail else ''}")
            await asyncio.sleep(0.1)


class Watcher:
    """A WebSocket client of the job (heartbeats too) through the notifiers, in order: it keeps every message's
    stream sequence and, whenever its socket drops, resumes on the next notifier with its cursors and a new ticket."""

    def __init__(self, notifiers: list[str], job_id: str, api: httpx.AsyncClient) -> None:
        self.notifiers, self.job_id, self.api = notifiers, job_id, api
        self.got: dict[str, list[tuple[int, str]]] = {"events": [], "logs": []}  # (stream sequence, event id)
        self.drops: list[tuple[float, str, str]] = []
        self.target: dict[str, int] | None = None  # stop once these stream sequences are in

    def cursor(self, stream: str) -> int | None:
        return self.got[stream][-1][0] if self.got[stream] else None

    def done(self) -> bool:
        return self.target is not None and all((self.cursor(s) or 0) >= n for s, n in self.target.items())

    async def run(self) -> None:
        turn = 0
        while not self.done():
            address = self.notifiers[turn % len(self.notifiers)]
            query = "heartbeats=1" + "".join(f"&after_{s}={c}" for s in self.got if (c := self.cursor(s)) is not None)
            try:
                ticket = (await self.api.post("/api/v1/ws-tickets", json={"jobs": [self.job_id]})).json()["ticket"]
                async with ws_connect(address, f"/api/v1/ws/jobs/{self.job_id}?{query}", ticket) as ws:
                    await authorized(ws)
                    while not self.done():
                        try:
                            msg = json.loads(await asyncio.wait_for(ws.recv(), 1.0))
                        except asyncio.TimeoutError:
                            continue
                        if msg["type"] == "event":
                            self.got[msg["stream"]].append((msg["seq"], msg["event"]["id"]))
            except (websockets.ConnectionClosed, OSError, AssertionError, asyncio.TimeoutError, httpx.HTTPError,
                    KeyError) as exc:  # its notifier went away (or said why it closed): the next one
                self.drops.append((time.monotonic(), address, repr(exc)[:200]))
                turn += 1
                await asyncio.sleep(0.5)


async def stream_messages(js, subject: str) -> list[tuple[int, float, Event]]:  # type: ignore[no-untyped-def]
    """Every message on ``subject`` now in its stream: (stream sequence, time stored, event)."""
    sub = await js.subscribe(subject, ordered_consumer=True)
    out = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=3)
            except nats.errors.TimeoutError:
                break
            md = msg.metadata
            out.append((md.sequence.stream, md.timestamp.timestamp(), Event.model_validate_json(msg.data)))
            if md.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return out


async def sql_rows(db_url: str, job_id: str) -> dict[str, int]:
    """Rows per event id of the job in every table the writer fills (log rows: one per line)."""
    conn = await asyncpg.connect(db_url.replace("+asyncpg", ""))
    try:
        rows: dict[str, int] = defaultdict(int)
        for table in sorted(set(STORED.values())):
            for r in await conn.fetch(f"SELECT event_id, count(*) AS n FROM {table} WHERE job_id = $1 "
                                      "GROUP BY event_id", job_id):
                rows[r["event_id"]] += r["n"]
        return rows
    finally:
        await conn.close()


def expected_rows(messages: list[tuple[int, float, Event]]) -> dict[str, int]:
    return {ev.id: len(ev.data.lines) if ev.data.kind == "log" else 1 for _, _, ev in messages
            if ev.data.kind in STORED}


def pending_spools(job_dir: Path) -> list[Path]:
    from kiln_sdk.spool import Spool

    return [p for p in job_dir.rglob("events.jsonl") if Spool(p.parent).pending]


async def until(check, timeout: float, every: float = 0.2):  # type: ignore[no-untyped-def]
    """``check()`` (awaited if need be) until it is truthy (exceptions count as not yet); returns its value, or
    None at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
        except Exception:  # noqa: BLE001 - a cluster electing a leader answers with several errors meanwhile
            pass
        await asyncio.sleep(every)
    return None


@dataclass
class Scenario:
    """One job on the deployment and what the test measures on it (``fig``: name -> seconds or a count)."""

    k: Kiln
    js: object
    api: httpx.AsyncClient
    job_id: str
    timeline: Timeline
    fig: dict[str, object] = field(default_factory=dict)

    def runners(self) -> str:
        return self.k.tail(*RUNNERS)

    async def cut_the_training_runner(self) -> tuple[str, float]:
        """Cut the runner host that trains attempt 1; its trainer must stop by itself once its claim lapses and a
        reaper elsewhere retry the attempt within the documented bound.  Returns the host and when attempt 2 ran."""
        timeline, fig, k = self.timeline, self.fig, self.k
        _, running = await timeline.wait("attempt 1 running", 180, attempt=1, kind="status", status="running",
                                         tail=self.runners)
        cut, first_pid = running.data.runner, running.data.details["pid"]
        await timeline.wait("attempt 1 training", 120, attempt=1, kind="progress", tail=self.runners)
        assert pid_alive(first_pid), "attempt 1 ended before its runner could be cut off: make the job longer"
        k.host(cut).cut()
        t_cut = time.monotonic()
        assert await until(lambda: not pid_alive(first_pid), 90, 0.1), "the cut-off runner kept its trainer going"
        t_stopped = time.monotonic()
        fig["cut -> cut-off trainer stopped by its runner"] = t_stopped - t_cut
        t_queued, _ = await timeline.wait("the retry", 90, attempt=2, kind="status", status="queued",
                                          tail=self.runners)
        t_running, running2 = await timeline.wait("attempt 2 running", 90, attempt=2, kind="status",
                                                  status="running", tail=self.runners)
        fig["cut -> retry queued by a reaper"] = t_queued - t_cut
        fig["cut -> retry running on another runner"] = t_running - t_cut
        assert running2.data.runner != cut
        assert t_queued - t_cut <= RETRY_BOUND_S, fig
        assert "claim not renewed" in k.log(cut).read_text()
        # Two attempts' trainers may overlap while the old one stops (never two of one attempt: checked at the end).
        fig["attempt 1's stopping trainer outlived attempt 2's start by"] = max(0.0, t_stopped - t_running)
        return cut, t_running

    async def kill_the_events_leader(self, t_running: float) -> float:
        """SIGKILL the node leading KILN_EVENTS while attempt 2 trains, then one writer and one notifier; bring the
        node back on its own store.  Returns the wall time of the kill."""
        js, k, fig = self.js, self.k, self.fig
        await self.timeline.wait("attempt 2 training", 120, attempt=2, kind="progress", tail=self.runners)
        info = await js.stream_info("KILN_EVENTS")
        leader, before = info.cluster.leader, info.state.last_seq
        k.kill(leader)
        t_kill, wall_kill = time.monotonic(), time.time()
        fig["NATS leader killed, into attempt 2's run"] = t_kill - t_running

        async def flowing() -> bool:
            return (await js.stream_info("KILN_EVENTS")).state.last_seq > before

        assert await until(flowing, 60, 0.1), f"KILN_EVENTS took nothing after {leader} died"
        fig["NATS leader killed -> a client sees the stream grow"] = time.monotonic() - t_kill
        k.kill("writer-1")
        k.kill("notifier-1")
        k.start_nats(leader)
        await asyncio.to_thread(wait_listening, k.host(leader).address, 4222, 30, k.procs[leader], k.log(leader))

        async def current() -> bool:
            replicas = (await js.stream_info("KILN_EVENTS")).cluster.replicas or []
            return len(replicas) == 2 and all(r.current for r in replicas)

        assert await until(current, 90), "the restarted node never caught up"
        fig["NATS node restarted -> all replicas current"] = time.monotonic() - t_kill
        return wall_kill

    async def completed(self, t_running: float) -> None:
        async def ended() -> dict | None:
            job = (await self.api.get(f"/api/v1/jobs/{self.job_id}")).json()
            return job if job["status"] in {"completed", "failed", "cancelled", "lost"} else None

        job = await until(ended, 300, 0.5)
        assert job and job["status"] == "completed" and job["attempt"] == 2, (job, self.runners())
        self.fig["attempt 2 running -> job completed (API)"] = time.monotonic() - t_running

    async def everything_once(self, watchers: list[Watcher], watching: list[asyncio.Task[None]]) -> list:
        """The job's messages in both streams, each once in PostgreSQL and once, in order, at both WebSocket
        clients.  Returns the KILN_EVENTS messages."""
        k, fig = self.k, self.fig
        events = await stream_messages(self.js, f"kiln.evt.*.{self.job_id}.*")
        logs = await stream_messages(self.js, f"kiln.log.*.{self.job_id}")
        target = {"events": events[-1][0], "logs": logs[-1][0]}
        for w in watchers:
            w.target = target
        await asyncio.wait_for(asyncio.gather(*watching), 60)
        for w in watchers:
            for stream, msgs in (("events", events), ("logs", logs)):
                got = [m for m in w.got[stream] if m[0] <= target[stream]]
                assert got == [(seq, ev.id) for seq, _, ev in msgs], (stream, w.notifiers, w.drops)
        assert any(k.notifier("notifier-1") == d[1] for d in watchers[0].drops), watchers[0].drops
        fig["WebSocket reconnects (watcher on the killed notifier, on the survivor)"] = (
            len(watchers[0].drops), len(watchers[1].drops))

        want = {**expected_rows(events), **expected_rows(logs)}

        async def stored() -> dict[str, int] | None:
            rows = await sql_rows(k.db_url, self.job_id)
            return rows if all(rows.get(i, 0) >= n for i, n in want.items()) else None

        rows = await until(stored, 60, 0.5) or await sql_rows(k.db_url, self.job_id)
        lost = [i for i, n in want.items() if rows.get(i, 0) < n]
        duplicated = [i for i, n in want.items() if rows.get(i, 0) > n] + [i for i in rows if i not in want]
        ids = [ev.id for _, _, ev in events + logs]
        fig["events in the streams (kept in SQL)"] = f"{len(ids)} ({len(want)})"
        fig["events lost in SQL"], fig["events duplicated in SQL"] = len(lost), len(duplicated)
        fig["events stored twice in the streams"] = len(ids) - len(set(ids))
        assert not lost and not duplicated and len(set(ids)) == len(ids), fig
        self.final_attempt(events, logs)
        return events

    def final_attempt(self, events: list, logs: list) -> None:
        """Attempt 2 gap-free per source with every status and epoch; attempt 1 stopped mid-way and silent; one
        trainer per attempt."""
        seqs: dict[str, list[int]] = defaultdict(list)
        for _, _, ev in events + logs:
            if ev.attempt == 2:
                seqs[ev.source].append(ev.seq)
        for source, got in seqs.items():
            assert sorted(got) == list(range(1, len(got) + 1)), (source, sorted(got))
        kinds = [(ev.attempt, ev.data.kind, status_of(ev), getattr(ev.data, "epoch", None)) for _, _, ev in events]
        assert [s for a, kd, s, _ in kinds if a == 2 and kd in ("status", "finished")] == [
            "queued", "starting", "running", "completed"]
        assert [e for a, kd, _, e in kinds if a == 2 and kd == "epoch"] == list(range(1, TRAIN["epochs"] + 1))
        assert not [kd for a, kd, _, _ in kinds if a == 1 and kd == "finished"]  # the fenced attempt ends silently
        first_epochs = [e for a, kd, _, e in kinds if a == 1 and kd == "epoch"]
        assert len(first_epochs) < TRAIN["epochs"], f"attempt 1 trained to its end ({first_epochs}): a longer job"
        self.fig["epochs attempt 1 finished before its runner stopped it"] = len(first_epochs)
        times = [ev.data.epoch_time or 0.0 for _, _, ev in events if ev.attempt == 2 and ev.data.kind == "epoch"]
        self.fig["epoch time of attempt 2 (mean)"] = sum(times) / len(times)
        for attempt in (1, 2):
            trainers = {(ev.data.runner, ev.data.details["pid"]) for _, _, ev in events
                        if ev.attempt == attempt and status_of(ev) == "running"}
            assert len(trainers) == 1, (attempt, trainers)


async def test_a_job_survives_a_cut_runner_a_killed_nats_leader_writer_and_notifier(kiln: Kiln) -> None:
    k = kiln
    nc = await nats.connect(servers(k.nats_url), **observer_options(k.bus.chain), max_reconnect_attempts=-1,
                            reconnect_time_wait=0.5)
    owner = (k.root / "secrets" / "owner.key").read_text().strip()
    api = httpx.AsyncClient(base_url=k.api_url, headers={"Authorization": f"Bearer {owner}"}, timeout=10)
    try:
        r = await api.post("/api/v1/jobs", json={"name": "multihost", "model": "yolov8n.yaml", "train": TRAIN,
                                                 "dataset": str(k.dataset), "max_attempts": 2})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        run = Scenario(k, nc.jetstream(timeout=2), api, job_id, await Timeline().start(nc, job_id))
        # Watcher 0 sits on the notifier that will be killed and resumes on the other; watcher 1 on the survivor.
        watchers = [Watcher([k.notifier("notifier-1"), k.notifier("notifier-2")], job_id, api),
                    Watcher([k.notifier("notifier-2")], job_id, api)]
        watching = [asyncio.create_task(w.run()) for w in watchers]
        assert (await api.post(f"/api/v1/jobs/{job_id}/start")).status_code == 202

        cut, t_running = await run.cut_the_training_runner()
        k.host(cut).restore()
        t_restored, cut_dir = time.monotonic(), k.root / cut / "jobs" / f"{job_id}-1"
        replayed = asyncio.create_task(until(lambda: not pending_spools(cut_dir) and time.monotonic(), 240, 0.2))
        wall_kill = await run.kill_the_events_leader(t_running)
        await run.completed(t_running)
        # Once its link is back, the cut-off runner publishes what it spooled for attempt 1 (never its end).
        t_replayed = await replayed
        assert t_replayed, pending_spools(cut_dir)
        run.fig["link restored -> cut-off runner's spools published"] = t_replayed - t_restored
        events = await run.everything_once(watchers, watching)
        first_after = min(ts for _, ts, _ in events if ts > wall_kill)
        run.fig["NATS leader killed -> next event stored"] = first_after - wall_kill
    finally:
        await api.aclose()
        await nc.close()
    run.fig["total test time (setup included)"] = time.monotonic() - k.started
    print("\nKiln across hosts, figures:")
    for name, value in run.fig.items():
        print(f"  {name}: {value:.1f} s" if isinstance(value, float) else f"  {name}: {value}")
