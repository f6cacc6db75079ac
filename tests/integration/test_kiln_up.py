"""`kiln up` under supervisord, on real processes: a crashed service comes back, one that keeps failing at start
is given up (FATAL) while the rest go on, and a stop ends every service at once, then NATS, leaving nothing."""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import signal
import stat
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import psutil
import pytest
from kiln_local.cli import _where
from kiln_local.stack import Stack, StackConfig, free_port
from kiln_local.supervision import START_RETRIES, Program, render
from supervisor.datatypes import RestartUnconditionally
from supervisor.options import ServerOptions

KILN = Path(sys.executable).parent / "kiln"
FAKE_TRAINER = str(Path(__file__).resolve().parents[1] / "fixtures" / "fake_trainer.py")
DRAIN_S = 3  # KILN_RUNNER_SHUTDOWN_GRACE_S: how long a stopping runner lets its running job go on


def stack_config(data_dir: Path, **kw: object) -> StackConfig:
    return StackConfig(data_dir=data_dir, api_port=free_port(), notifier_port=free_port(), nats_port=free_port(),
                       **kw)  # type: ignore[arg-type]


def when(line: str) -> float:
    """Time of a supervisord log line ("2026-01-02 03:04:05,678 INFO ...")."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def sup_log(stack: Stack) -> list[str]:
    return stack.log("supervisord").read_text().splitlines()


def wait_for(check, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout:.0f}s")


def healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def hold_port(port: int) -> socket.socket:
    """Listen on ``port`` as soon as the process that had it is gone: the next start of its service fails."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    wait_for(lambda: _bind(sock, port), 5, f"port {port} free")
    sock.listen()
    return sock


def _bind(sock: socket.socket, port: int) -> bool:
    try:
        sock.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False


def test_the_config_carries_awkward_values_through_supervisords_own_parser(tmp_path):
    data_dir = tmp_path / "odd dir;#x, y"
    (data_dir / "logs").mkdir(parents=True)
    env = {"A": "x, y", "B": '["a", "b"]', "C": "100%", "D": "p#w;d", "E": "it's", "F": "", "G": "%(here)s"}
    argv = ["/bin/echo", "two words", "50%", "'quoted'"]
    conf = data_dir / "supervisord.conf"
    conf.write_text(render([Program("svc", argv, env)], nats=Program("nats", ["/bin/true"]), data_dir=data_dir,
                           socket=data_dir / "s.sock", password="pw", root=False))
    opts = ServerOptions()
    opts.realize(args=["-c", str(conf)])
    progs = {p.name: p for g in opts.process_group_configs for p in g.process_configs}
    assert {g.name: g.priority for g in opts.process_group_configs} == {"nats": 10, "kiln": 100}
    svc = progs["svc"]
    assert (shlex.split(svc.command), svc.environment, svc.directory) == (argv, env, str(data_dir))
    assert svc.stdout_logfile == str(data_dir / "logs" / "svc.log") and svc.redirect_stderr
    assert (svc.autostart, svc.autorestart, svc.startretries, svc.stopasgroup, svc.killasgroup) == (
        False, RestartUnconditionally, START_RETRIES, True, True)
    assert progs["nats"].autostart
    for bad, where in [({"A": "a #comment"}, data_dir), ({"A": "line\nbreak"}, data_dir),
                       ({"A": "both ' and \""}, data_dir), ({"A": '"edge'}, data_dir), ({}, tmp_path / "50%")]:
        with pytest.raises(ValueError):
            render([Program("svc", argv, bad)], nats=None, data_dir=where, socket=where / "s.sock", password="pw",
                   root=False)


def test_a_killed_service_comes_back_and_one_that_keeps_failing_is_given_up(tmp_path):
    with Stack(stack_config(tmp_path / "kiln", metrics_port=free_port())) as stack:
        # every service answers Prometheus and its probes where `kiln up` says
        urls = stack.metrics_urls()
        assert set(urls) == {"api", "notifier", "metrics-writer", "runner-0"} and all(u in _where(stack) for u in urls.values())
        for name, url in urls.items():
            wait_for(lambda url=url: healthy(url.replace("/metrics", "/readyz")), 30, f"{name} ready")
            assert "kiln_" in httpx.get(url, timeout=5).text, name
        # first start: the owner's key, readable only by this user, signs in; nothing answers without it
        assert stat.S_IMODE(stack.secrets.stat().st_mode) == 0o700
        assert stat.S_IMODE(stack.owner_key_file.stat().st_mode) == 0o600
        me = httpx.get(f"{stack.api_url}/api/v1/me", headers={"Authorization": f"Bearer {stack.owner_key()}"})
        assert me.status_code == 200 and me.json()["is_owner"]
        assert httpx.get(f"{stack.api_url}/api/v1/jobs").status_code == 401
        assert str(stack.owner_key_file) in _where(stack) and stack.owner_key() not in _where(stack)
        health = f"http://127.0.0.1:{stack.cfg.notifier_port}/healthz"
        old = stack.processes()["notifier"]["pid"]
        t0 = time.monotonic()
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: stack.processes()["notifier"]["pid"] not in (0, old) and healthy(health), 15,
                 "notifier back after SIGKILL")
        took = time.monotonic() - t0
        log = "\n".join(sup_log(stack))
        assert "exited: notifier (terminated by SIGKILL; not expected)" in log
        assert log.count("spawned: 'notifier'") == 2
        assert stack.dead() == []
        print(f"notifier answered /healthz again {took:.2f}s after SIGKILL")

        # (b) its port is taken now: every start fails within a second or two, with growing pauses between them
        pid = wait_for(lambda: stack.processes()["notifier"]["statename"] == "RUNNING"  # past START_SECS
                       and stack.processes()["notifier"]["pid"], 15, "notifier started for good")
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        with hold_port(stack.cfg.notifier_port):
            assert wait_for(stack.dead, 60, "notifier given up") == ["notifier"]
            took = time.monotonic() - t0
            assert healthy(f"{stack.api_url}/healthz"), "the other services keep running"
            states = {n: p["statename"] for n, p in stack.processes().items()}
            assert states == {**{n: "RUNNING" for n in states}, "notifier": "FATAL"}
            lines = sup_log(stack)
            spawns = [when(ln) for ln in lines if "spawned: 'notifier'" in ln][2:]
            assert len(spawns) == START_RETRIES + 1, spawns
            pauses = [b - a for a, b in itertools.pairwise(spawns)]
            assert all(p >= n for n, p in enumerate(pauses, 1)), f"no backoff: {pauses}"
            assert any("gave up: notifier entered FATAL state" in ln for ln in lines)
            print(f"given up {took:.1f}s after the port was taken; pauses between starts {[round(p, 1) for p in pauses]}")
        stack.rpc().supervisor.startProcess("kiln:notifier", False)  # what `supervisorctl start` does
        wait_for(lambda: healthy(health), 15, "notifier back once its port is free")
        assert stack.dead() == []


def test_stop_ends_every_service_at_once_then_nats_and_leaves_nothing(tmp_path):
    """Two runners each with a running job drain side by side (one after the other, the stop would take twice)."""
    dataset = tmp_path / "ds"
    dataset.mkdir()
    (dataset / "data.yaml").write_text("path: .\ntrain: images\nval: images\nnames: {0: a}\n")
    env = {"KILN_RUNNER_TRAINER_CMD": json.dumps([sys.executable, FAKE_TRAINER]), "FAKE_LOG": str(tmp_path / "fake"),
           "KILN_RUNNER_SHUTDOWN_GRACE_S": str(DRAIN_S), "KILN_RUNNER_DATA_ROOTS": str(tmp_path)}
    stack = Stack(stack_config(tmp_path / "kiln", runners=2, extra_env=env)).start()
    try:
        auth = {"Authorization": f"Bearer {stack.owner_key()}"}
        jobs = [httpx.post(f"{stack.api_url}/api/v1/jobs", timeout=10, headers=auth, json={
            "model": "yolov8n.yaml", "dataset": str(dataset), "start": True, "train": {"epochs": 400}}).json()["id"]
            for _ in range(2)]
        wait_for(lambda: all(httpx.get(f"{stack.api_url}/api/v1/jobs/{j}", timeout=10, headers=auth).json()["status"]
                             == "running" for j in jobs), 60, "both jobs running")
        pids = {n: p["pid"] for n, p in stack.processes().items()} | {"supervisord": stack.supervisord.pid}
        with pytest.raises(SystemExit, match="already runs"):  # a second one would overwrite its supervisord.conf
            Stack(stack_config(tmp_path / "kiln", nats_url=stack.nats_url)).start()
    finally:
        t0 = time.monotonic()
        stack.stop()
        took = time.monotonic() - t0
    lines = sup_log(stack)
    begin = next(i for i, ln in enumerate(lines) if "received SIGTERM" in ln)
    waiting = next(ln for ln in lines[begin:] if "waiting for" in ln)
    kiln = {"metrics-writer", "notifier", "api", "runner-0", "runner-1"}
    assert kiln <= set(re.search(r"waiting for (.*) to die", waiting)[1].split(", ")), waiting  # type: ignore[index]
    stopped = {m[1]: when(ln) for ln in lines[begin:] if (m := re.search(r"stopped: (\S+) ", ln))}
    assert set(stopped) == kiln | {"nats"}
    assert all(stopped["nats"] >= stopped[n] for n in kiln), stopped
    drained = [stopped[r] - when(lines[begin]) for r in ("runner-0", "runner-1")]
    assert min(drained) >= DRAIN_S and abs(drained[0] - drained[1]) < DRAIN_S / 2, drained
    assert not [n for n, pid in pids.items() if psutil.pid_exists(pid)]
    print(f"stop took {took:.2f}s with two runners draining {DRAIN_S}s each: they ended "
          f"{drained[0]:.2f}s and {drained[1]:.2f}s after SIGTERM")


def test_kiln_up_says_when_it_restarts_a_service_and_exits_cleanly_on_ctrl_c(tmp_path):
    notifier_port = free_port()
    argv = [str(KILN), "up", "--data-dir", str(tmp_path / "kiln"), "--api-port", str(free_port()),
            "--notifier-port", str(notifier_port), "--nats-port", str(free_port())]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout or ()), daemon=True)
    reader.start()

    def said(text: str) -> bool:
        return any(text in ln for ln in list(out))

    try:
        wait_for(lambda: said("Ctrl-C stops it."), 90, "kiln up ready")
        kids = psutil.Process(proc.pid).children(recursive=True)
        pids = {p.pid for p in kids}
        notifier = next(p for p in kids if "kiln_notifier" in p.cmdline())
        notifier.kill()
        wait_for(lambda: said("exited: notifier (terminated by SIGKILL; not expected)"), 10, "the crash reported")
        wait_for(lambda: sum("spawned: 'notifier'" in ln for ln in list(out)) == 2, 10, "the restart reported")
        pids |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}

        notifier = next(p for p in psutil.Process(proc.pid).children(recursive=True)
                        if "kiln_notifier" in p.cmdline())
        notifier.kill()
        with hold_port(notifier_port):
            wait_for(lambda: said("notifier kept failing at start and was given up (FATAL)"), 60, "FATAL reported")
            pids |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(40) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(5)
    text = "".join(out)
    assert "stopped: nats" in text, text[-3000:]
    fatal = next(ln for ln in out if "given up (FATAL)" in ln)
    assert str(tmp_path / "kiln" / "logs" / "notifier.log") in fatal
    assert not [pid for pid in pids if psutil.pid_exists(pid)], "orphans left behind"
