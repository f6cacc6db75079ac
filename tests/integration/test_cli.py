"""The remote `kiln` command as a user runs it: a real subprocess against the whole local stack (bundled nats-server,
API, notifier, metrics-writer, a runner training YOLO for real), configured only by HOME / XDG_CONFIG_HOME / KILN_*.

Login keeps the key out of argv (stdin) and in a 0600 file; train --follow prints Ultralytics-like epoch lines and
exits 0; logs, download (checksum verified), metrics and --json listings read the finished job; a long job survives
a notifier restart under `kiln follow` (nothing missing, nothing twice) and `kiln cancel` makes `follow` exit with
the cancelled code. The library itself (AsyncKiln) replays the same history.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from kiln_client import AsyncKiln, Kiln, KilnError
from kiln_client.cli import exitcodes
from kiln_local.stack import Stack, StackConfig, free_port
from kiln_local.synth import make_detection_dataset

pytestmark = pytest.mark.e2e
KILN = Path(sys.executable).parent / "kiln"
TRAIN = ["imgsz=64", "batch=8", "nbs=8", "workers=0", "warmup_epochs=0", "seed=0"]
EPOCH_LINE = re.compile(r"^\s+(\d+)/(\d+)\s")
RECHECK_S = 10


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    base = tmp_path_factory.mktemp("kiln-cli")
    data = make_detection_dataset(base / "datasets" / "shapes", n_train=16, n_val=8, imgsz=64)
    # The notifier wants a renewed ticket every RECHECK_S (300 in production): followers here must renew on time.
    env = {"KILN_RUNNER_DATA_ROOTS": str(data.parent), "KILN_NOTIFIER_RECHECK_S": str(RECHECK_S)}
    cfg = StackConfig(data_dir=base / "kiln", api_port=free_port(), notifier_port=free_port(), nats_port=free_port(),
                      extra_env=env)
    with Stack(cfg) as s:
        s.dataset = data  # type: ignore[attr-defined]
        yield s


@pytest.fixture(scope="module")
def env(stack, tmp_path_factory):
    """A user's environment with nothing of Kiln in it yet: HOME and XDG_CONFIG_HOME in a fresh folder."""
    home = tmp_path_factory.mktemp("home")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    return clean | {"HOME": str(home), "XDG_CONFIG_HOME": str(home / "cfg"), "COLUMNS": "200"}


def kiln(*args: str, env: dict[str, str], stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `kiln ARGS` as a user would; ``stdin`` is typed in (the key for `kiln login`), else stdin is empty."""
    return subprocess.run([str(KILN), *args], check=False, env=env, input=stdin, capture_output=True, text=True,
                          timeout=timeout, stdin=None if stdin is not None else subprocess.DEVNULL)


@pytest.fixture(scope="module")
def logged_in(stack, env):
    """`kiln login URL` with the owner's key on stdin (never in argv)."""
    r = kiln("login", stack.api_url, env=env, stdin=stack.owner_key() + "\n")
    assert r.returncode == 0, r.stderr
    return env


@pytest.fixture(scope="module")
def completed(stack, logged_in):
    """A real 2-epoch YOLO training, created and followed by `kiln train ... --follow`."""
    t0 = time.monotonic()
    r = kiln("train", "model=yolov8n.yaml", f"data={stack.dataset}", "epochs=2", "name=cli-e2e", *TRAIN,
             "--follow", env=logged_in, timeout=240)
    print(f"train --follow took {time.monotonic() - t0:.1f}s")
    job_id = re.search(r"job (\w+) queued", r.stdout)
    assert job_id, r.stdout + r.stderr
    return job_id[1], r


def test_login_keeps_the_key_in_a_0600_file_and_a_bad_key_gets_a_clear_refusal(stack, env):
    key = stack.owner_key()
    path = Path(env["XDG_CONFIG_HOME"]) / "kiln" / "config.toml"
    bad = kiln("login", stack.api_url, env=env, stdin="kiln_0000000000_notavalidkeyatall\n")
    assert bad.returncode == exitcodes.ERROR
    assert "refused the key" in bad.stderr and "notavalidkeyatall" not in bad.stderr + bad.stdout
    assert not path.exists()  # nothing saved for a key the API refused

    r = kiln("login", stack.api_url, env=env, stdin=key + "\n")
    assert r.returncode == 0, r.stderr
    assert "as owner" in r.stdout and key not in r.stdout + r.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert key in path.read_text()

    me = kiln("me", "--json", env=env)
    assert me.returncode == 0 and json.loads(me.stdout)["is_owner"] is True
    revoked = kiln("jobs", env=env | {"KILN_API_KEY": "kiln_0000000000_notavalidkeyatall"})  # env overrides the file
    assert revoked.returncode == exitcodes.ERROR and "refused the key" in revoked.stderr
    nowhere = kiln("jobs", env=env | {"XDG_CONFIG_HOME": str(path.parent / "empty")})
    assert nowhere.returncode == exitcodes.ERROR and "kiln login" in nowhere.stderr


def test_train_follow_then_logs_download_metrics_and_json(stack, logged_in, completed, tmp_path):
    job_id, r = completed
    env = logged_in
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4401" not in r.stderr and "connection to the notifier" not in r.stderr, r.stderr
    lines = r.stdout.splitlines()
    header = next(ln for ln in lines if "Epoch" in ln)
    assert header.split()[:4] == ["Epoch", "box_loss", "cls_loss", "dfl_loss"] and "mAP50-95" in header
    assert [m[1] for ln in lines if (m := EPOCH_LINE.match(ln))] == ["1", "2"]
    assert lines[-1].startswith("completed in")

    listed = json.loads(kiln("jobs", "--json", "--status", "completed", env=env).stdout)
    assert job_id in [j["id"] for j in listed]
    shown = json.loads(kiln("show", job_id, "--json", env=env).stdout)
    assert shown["status"] == "completed" and shown["epoch"] == 2 and shown["spec"]["train"]["imgsz"] == 64
    best = next(a for a in reversed(shown["artifacts"]) if a["name"] == "best.pt")

    logs = kiln("logs", job_id, "--tail", "50", env=env)
    assert logs.returncode == 0 and "\x1b" not in logs.stdout and logs.stdout.strip()
    assert kiln("logs", job_id, "-f", env=env).returncode == 0  # the job completed

    got = kiln("download", job_id, "-o", str(tmp_path / "weights"), env=env)
    assert got.returncode == 0 and "sha256 verified" in got.stdout, got.stderr
    weights = tmp_path / "weights" / "best.pt"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == best["sha256"]
    missing = kiln("download", job_id, "nope.pt", env=env)
    assert missing.returncode == exitcodes.ERROR and "404" in missing.stderr

    csv = kiln("metrics", job_id, "--csv", "--kind", "epoch", env=env).stdout.splitlines()
    assert csv[0].startswith("step,") and "metrics/mAP50(B)" in csv[0].split(",")
    assert [row.split(",")[0] for row in csv[1:]] == ["1", "2"]

    again = kiln("follow", job_id, env=env)  # an ended job: its epochs from the API and its exit code at once
    assert again.returncode == 0 and [m[1] for ln in again.stdout.splitlines() if (m := EPOCH_LINE.match(ln))] == [
        "1", "2"]


def test_follow_resumes_after_a_notifier_restart_and_exits_with_the_cancelled_code(stack, logged_in, tmp_path):
    env = logged_in
    job_file = tmp_path / "job.yaml"
    job_file.write_text(f"model: yolov8n.yaml\ndata: {stack.dataset}\nname: cli-long\nepochs: 2\n"
                        + "".join(f"{a.replace('=', ': ')}\n" for a in TRAIN))
    created = kiln("train", "-f", str(job_file), "epochs=300", "--json", env=env)  # key=value overrides the file
    assert created.returncode == 0, created.stderr
    job = json.loads(created.stdout)
    assert job["spec"]["train"]["epochs"] == 300 and job["name"] == "cli-long"

    proc = subprocess.Popen([str(KILN), "follow", job["id"]], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(proc.stdout or ()), daemon=True)
    reader.start()

    def epochs() -> list[int]:
        return [int(m[1]) for ln in list(seen) if (m := EPOCH_LINE.match(ln))]

    def wait_for(check, what: str, timeout: float = 90) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not check():
            assert proc.poll() is None, f"follow exited early ({proc.returncode}): {''.join(seen)}"
            assert time.monotonic() < deadline, f"{what}: not within {timeout}s: {''.join(seen)}"
            time.sleep(0.1)

    t0 = time.monotonic()
    try:
        # epochs, and the first socket outlives its ticket (so it must have renewed it) before the restart
        wait_for(lambda: epochs() and time.monotonic() - t0 > RECHECK_S + 2, "epoch lines")
        stack.rpc().supervisor.stopProcess("kiln:notifier")  # the socket drops; epochs go on meanwhile
        time.sleep(2)
        stack.rpc().supervisor.startProcess("kiln:notifier")
        reached = max(epochs())
        wait_for(lambda: max(epochs()) >= reached + 2, "epochs after the restart")
        cancel = kiln("cancel", job["id"], env=env)
        assert cancel.returncode == 0 and "cancel requested" in cancel.stdout
        assert proc.wait(60) == exitcodes.CANCELLED
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(5)
    err = proc.stderr.read() if proc.stderr else ""
    assert "connection to the notifier" in err and "resuming" in err, err
    assert "4401" not in err, err  # never cut off for want of a renewed ticket
    shown = epochs()
    assert shown == list(range(1, len(shown) + 1)), shown  # every epoch once, in order, across the restart
    assert seen[-1].startswith("cancelled"), seen[-3:]
    assert kiln("follow", job["id"], env=env).returncode == exitcodes.CANCELLED


def test_rerun_then_cancel_and_the_library_replays_history(stack, logged_in, completed):
    job_id, _ = completed
    rerun = kiln("rerun", job_id, "--json", env=logged_in)
    assert rerun.returncode == 0, rerun.stderr
    new = json.loads(rerun.stdout)
    assert new["rerun_of"] == job_id and new["id"] != job_id
    assert kiln("cancel", new["id"], env=logged_in).returncode == 0
    assert kiln("follow", new["id"], "--timeout", "90", env=logged_in).returncode == exitcodes.CANCELLED

    with Kiln(stack.api_url, stack.owner_key()) as sync:
        with pytest.raises(KilnError) as refused:
            sync.get_job("no-such-job")
        assert refused.value.status == 404 and "not found" in refused.value.detail

    async def replay() -> list[str]:
        async with AsyncKiln(stack.api_url, stack.owner_key()) as client:
            return [ev.kind async for ev in client.follow(job_id, timeout=60)]

    kinds = asyncio.run(replay())
    assert kinds[-1] == "finished" and kinds.count("epoch") == 2 and "status" in kinds
