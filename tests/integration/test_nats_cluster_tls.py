"""Three nats-servers in operator mode (the generated configuration) form a JetStream cluster over mutual-TLS routes:
the provisioner makes every stream with three replicas, events survive the loss of a server, and a server whose
certificate is from another CA never joins."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from kiln_contracts import Event, JobStatus, JobStatusChanged, streams
from kiln_contracts.natsauth.permissions import EVENTS
from kiln_contracts.natsauth.provision import provision
from kiln_contracts.natsauth.server import Cluster, TrustChain, setup_trust, write_server_config
from kiln_testing import free_port, nats_server_bin, stop_process, wait_for_port
from kiln_testing.natsauth import AuthNats, client, make_ca, observer_options


@dataclass
class Node:
    name: str
    server: AuthNats
    monitor: int
    route_port: int

    def peers(self) -> set[str]:
        """The servers this one has a route to (several routes each: NATS pools them)."""
        routes = httpx.get(f"http://127.0.0.1:{self.monitor}/routez", timeout=2).json().get("routes") or []
        return {r["remote_name"] for r in routes}


def _node(root: Path, chain: TrustChain, name: str, route_port: int, routes: tuple[str, ...], tls) -> Node:
    port, monitor = free_port(), free_port()
    conf = write_server_config(chain, root / f"{name}.conf", port=port, store_dir=root / name / "js",
                               resolver_dir=root / name / "resolver", server_name=name, monitor_port=monitor,
                               cluster=Cluster("kiln", route_port, routes, tls=tls))
    server = AuthNats(chain, conf, port, ("default",))
    server.inboxes = {"provisioner": "_INBOX.provisioner", "runner-default": "_INBOX.runner-default"}
    return Node(name, server, monitor, route_port)


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[list[Node]]:
    ca = make_ca(tmp_path / "ca")
    chain = setup_trust(tmp_path / "trust")
    route_ports = [free_port() for _ in range(3)]
    routes = tuple(f"127.0.0.1:{p}" for p in route_ports)
    nodes = [_node(tmp_path, chain, f"kiln-{i + 1}", route_ports[i], routes, ca.server_tls()) for i in range(3)]
    for n in nodes:
        with open(n.server.log_path, "ab") as log:
            n.server.proc = subprocess.Popen([nats_server_bin(), "-c", str(n.server.conf)], stdout=log,
                                             stderr=subprocess.STDOUT)
    try:
        for n in nodes:
            wait_for_port(n.server.port, n.server.proc, n.server.log_path)
        yield nodes
    finally:
        for n in nodes:
            stop_process(n.server.proc)


async def _until(check, timeout: float = 30.0, every: float = 0.2):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = await check()
            if result:
                return result
        except Exception:  # noqa: BLE001 - a cluster electing its leaders answers with several errors meanwhile
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(every)


async def test_a_three_node_cluster_over_tls_routes_keeps_events_when_a_server_goes(cluster: list[Node],
                                                                                     tmp_path: Path) -> None:
    await _until(lambda: _sync(all(len(n.peers()) == 2 for n in cluster)))
    prov = await client(cluster[0].server, "provisioner")

    async def provisioned() -> bool:
        await provision(prov.js, ("default",), replicas=3)
        return True

    await _until(provisioned, timeout=60, every=1.0)  # the meta leader is elected a moment after the routes
    info = await prov.js.stream_info(EVENTS)
    assert info.config.num_replicas == 3 and info.cluster is not None and len(info.cluster.replicas or []) == 2
    kv = await prov.js.stream_info(f"KV_{streams.CLAIMS_BUCKET}")
    assert kv.config.num_replicas == 3
    # Provisioning again without a count keeps the three copies (an operator's replicas are never reset).
    await provision(prov.js, ("default",))
    assert (await prov.js.stream_info(EVENTS)).config.num_replicas == 3
    leader = info.cluster.leader
    await prov.close()

    ev = Event.new(job_id="j1", project="p1", attempt=1, seq=1, source="runner",
                   data=JobStatusChanged(status=JobStatus.running))
    runner = await client(cluster[0].server, "runner-default")
    await runner.js.publish(ev.subject, ev.to_bytes(), headers=ev.headers())
    await runner.close()

    # The stream's leader goes away; the other two elect a new one and keep every event.
    gone = next(n for n in cluster if n.name == leader)
    stop_process(gone.server.proc)
    rest = [n for n in cluster if n is not gone]
    import nats

    nc = await nats.connect(rest[0].server.url, **observer_options(rest[0].server.chain))
    js = nc.jetstream(timeout=2)

    async def new_leader() -> str | None:
        info = await js.stream_info(EVENTS)
        return info.cluster.leader if info.cluster and info.cluster.leader not in (None, leader) else None

    assert await _until(new_leader, timeout=30) in {n.name for n in rest}
    second = Event.new(job_id="j1", project="p1", attempt=1, seq=2, source="runner",
                       data=JobStatusChanged(status=JobStatus.completed))
    await js.publish(second.subject, second.to_bytes(), headers=second.headers())
    got = [(await js.get_msg(EVENTS, seq)).data for seq in (1, 2)]
    assert [Event.model_validate_json(d).seq for d in got] == [1, 2]
    await nc.close()


async def test_a_server_with_a_certificate_of_another_ca_never_joins(cluster: list[Node], tmp_path: Path) -> None:
    await _until(lambda: _sync(all(len(n.peers()) == 2 for n in cluster)))
    rogue_ca = make_ca(tmp_path / "rogue-ca", "rogue-ca")
    chain = cluster[0].server.chain
    routes = tuple(f"127.0.0.1:{n.route_port}" for n in cluster)
    rogue = _node(tmp_path, chain, "rogue", free_port(), routes, rogue_ca.server_tls())
    rogue.server.start()
    try:
        await asyncio.sleep(3)  # a few route attempts each way
        assert rogue.peers() == set() and all(n.peers() == {m.name for m in cluster} - {n.name} for n in cluster)
        log = "".join(n.server.log() for n in cluster) + rogue.server.log()
        assert "TLS route handshake error" in log and "certificate signed by unknown authority" in log, log[-2000:]
    finally:
        rogue.server.stop()


async def _sync(value: bool) -> bool:
    return value
