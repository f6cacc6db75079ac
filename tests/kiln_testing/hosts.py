"""Several hosts on one machine: each a Linux network namespace with its own address on a private bridge.

A :class:`Network` makes a bridge in the root namespace (which keeps the first address: the test process, on the
same network as the hosts, reaches every one of them) and one namespace per :meth:`Network.add`, joined to the
bridge by a veth pair.  A host runs processes (:meth:`Host.popen`: ``ip netns exec``), loses its link
(:meth:`Host.cut`: the bridge end of its cable goes down, like an unplugged cable: packets vanish, nothing is
refused) and gets it back (:meth:`Host.restore`).  :meth:`Network.close` kills every process inside the
namespaces (those started here and their children, trainers included), then deletes the namespaces, the links and
the bridge, also after a failure.  :class:`Postgres` runs a private PostgreSQL server in a host.

Needs root and iproute2 (:func:`unavailable` says why not).  Names carry a random tag and the subnet is drawn at
random in 10.64.0.0/10, so two tests (or two engineers) on one machine do not meet.

Example:
    with Network() as net:
        nats, runner = net.add("nats"), net.add("runner")
        nats.popen(["nats-server", "-a", nats.address], log=tmp / "nats.log")
        runner.popen([sys.executable, "-m", "kiln_runner"], env={"KILN_RUNNER_NATS_URL": nats.url("nats", 4222)})
        runner.cut(); ...; runner.restore()
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Host", "Network", "Postgres", "unavailable", "wait_listening"]


def unavailable() -> str | None:
    """Why network namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add, veth pairs, a bridge)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing"
    if not Path("/proc/self/ns/net").exists():
        return "this kernel has no network namespaces"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def wait_listening(address: str, port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None,
                   log: Path | None = None) -> None:
    """Return once ``address:port`` accepts a TCP connection; fail at once if ``proc`` exits (with ``log``'s tail)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening on {port}:\n{tail}")
        try:
            with socket.create_connection((address, port), timeout=0.3):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {address}:{port} after {timeout:.0f}s") from None
            time.sleep(0.05)


@dataclass
class Host:
    """One namespace: its address, the bridge end of its cable, the processes started in it."""

    name: str
    ns: str
    address: str
    link: str  # the veth end on the bridge: down = the cable is cut
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def url(self, scheme: str, port: int) -> str:
        return f"{scheme}://{self.address}:{port}"

    def popen(self, argv: list[str], *, env: dict[str, str] | None = None, log: Path | None = None,
              cwd: Path | None = None, user: str | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside this host (as ``user`` when given), its output appended to ``log``.

        The process is the command itself (``ip netns exec`` execs it), in a session of its own.
        """
        prefix = ["ip", "netns", "exec", self.ns]
        if user is not None:
            prefix += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"]
        out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - the child keeps a copy
        try:
            proc = subprocess.Popen([*prefix, *argv], env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if log is not None:
                out.close()  # type: ignore[union-attr]
        self.procs.append(proc)
        return proc

    def run(self, argv: list[str], **options: object) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside this host to its end (``subprocess.run`` options)."""
        return subprocess.run(["ip", "netns", "exec", self.ns, *argv], text=True, **options)  # type: ignore[call-overload, no-any-return]

    def cut(self) -> None:
        """Unplug the cable: the host's end stays up with its address, but nothing reaches it or leaves it."""
        _ip("link", "set", self.link, "down")

    def restore(self) -> None:
        _ip("link", "set", self.link, "up")

    def pids(self) -> list[int]:
        """Every process in the namespace (including children of what :meth:`popen` started)."""
        out = _ip("netns", "pids", self.ns, check=False).stdout
        return [int(p) for p in out.split()]

    def kill_all(self) -> None:
        """SIGKILL every process of the namespace, then reap the ones started here."""
        for _ in range(3):  # a dying parent may still fork once: look again
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass


def _subnet() -> str:
    return f"10.{random.randint(64, 127)}.{random.randint(0, 255)}"


class Network:
    """A bridge with a random /24 in 10.64.0.0/10; the root namespace holds ``.1``, hosts get ``.2`` upwards."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.bridge = f"kb{self.tag}"  # interface names: 15 characters at most
        self.prefix = _subnet()
        self.hosts: dict[str, Host] = {}
        self._up = False

    def start(self) -> Network:
        taken = _ip("-o", "-4", "addr").stdout
        while f" {self.prefix}." in taken:  # a subnet this machine already has (another test's network)
            self.prefix = _subnet()
        _ip("link", "add", self.bridge, "type", "bridge")
        self._up = True
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        return self

    @property
    def gateway(self) -> str:
        """The root namespace's address on the bridge: where the test process itself is seen from the hosts."""
        return f"{self.prefix}.1"

    def add(self, name: str) -> Host:
        """A new host named ``name`` (namespace ``k<tag>-<name>``), up and reachable once this returns."""
        if name in self.hosts:
            raise ValueError(f"host {name} exists")
        index = len(self.hosts) + 2
        ns, link = f"k{self.tag}-{name}", f"k{self.tag}h{index}"
        _ip("netns", "add", ns)
        host = Host(name, ns, f"{self.prefix}.{index}", link)
        self.hosts[name] = host
        _ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", link, "master", self.bridge, "up")
        _ip("-n", ns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")  # no default route: anything beyond the bridge is unreachable at once
        return host

    def close(self) -> None:
        """Kill every process of every host, delete the namespaces (their veth pairs go with them), the bridge."""
        for host in self.hosts.values():
            host.kill_all()
        for host in self.hosts.values():
            _ip("netns", "del", host.ns, check=False)
            _ip("link", "del", host.link, check=False)  # gone with its namespace already, unless that failed
        self.hosts.clear()
        if self._up:
            _ip("link", "del", self.bridge, check=False)
            self._up = False

    def __enter__(self) -> Network:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


class Postgres:
    """A private PostgreSQL server in ``host``, listening on its address, trust authentication (tests only).

    The server binaries refuse root: the cluster folder (a fresh temporary one, outside any test folder a
    non-root user cannot enter) belongs to ``user`` and the server runs as that user.
    """

    def __init__(self, host: Host, *, port: int = 5432, user: str = "postgres", log: Path | None = None) -> None:
        self.host, self.port, self.user, self.log = host, port, user, log
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not bins:
            raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
        self.bin = bins[-1].parent
        self.dir = Path(tempfile.mkdtemp(prefix="kiln-pg-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, database: str = "postgres", driver: str = "postgresql+asyncpg") -> str:
        return f"{driver}://{self.user}@{self.host.address}:{self.port}/{database}"

    def start(self, timeout: float = 60.0) -> Postgres:
        shutil.chown(self.dir, self.user, self.user)
        data = self.dir / "data"
        subprocess.run(["setpriv", f"--reuid={self.user}", f"--regid={self.user}", "--init-groups", "--",
                        str(self.bin / "initdb"), "-D", str(data), "-U", self.user, "--auth=trust", "-E", "UTF8",
                        "--no-sync"], check=True, capture_output=True)
        with open(data / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {self.host.address.rsplit('.', 1)[0]}.0/24 trust\n")
        self.proc = self.host.popen(
            [str(self.bin / "postgres"), "-D", str(data), "-p", str(self.port), "-c",
             f"listen_addresses={self.host.address}", "-c", f"unix_socket_directories={self.dir}", "-c", "fsync=off",
             "-c", "max_connections=200"], log=self.log, user=self.user)
        wait_listening(self.host.address, self.port, timeout, self.proc, self.log)
        return self

    async def create_database(self, name: str) -> str:
        """Create ``name``; returns its SQLAlchemy URL."""
        import asyncpg

        conn = await asyncpg.connect(self.url(driver="postgresql"), timeout=10)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.url(name)

    def remove(self) -> None:
        """Delete the cluster folder (stop the server first: :meth:`Network.close` kills it with its host)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)
