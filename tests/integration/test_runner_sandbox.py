"""Trainers under their own Unix user (KILN_RUNNER_TRAINER_UID_BASE): a real runner process as root starts a trainer
as the slot's uid, which can read its own creds and write its folder, and nothing that is the runner's: its secrets,
its spool, the job.json that names the job, another attempt's folder."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln_testing.runners import RunnerProc, publish_start, spec

SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")  # the venv's may live under a home only root enters
pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="trainers under their own uid need a root runner"),
              pytest.mark.skipif(SYSTEM_PYTHON is None, reason="no system python3 for the probe trainer")]
BASE = 61000

PROBE = """
import json, os, pathlib
job = pathlib.Path(os.environ["KILN_JOB_DIR"])
seen = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "home": os.environ["HOME"]}
def attempt(name, fn):
    try:
        fn()
        seen[name] = "done"
    except OSError as exc:
        seen[name] = type(exc).__name__
attempt("read the runner's secret", lambda: open(os.environ["RUNNER_SECRET"]).read())
attempt("read another attempt's folder", lambda: os.listdir(os.environ["OTHER_ATTEMPT"]))
attempt("delete job.json", lambda: (job / "job.json").unlink())
attempt("rewrite job.json", lambda: (job / "job.json").write_text("{}"))
attempt("write into the runner's spool", lambda: (job / "runner-spool" / "events.jsonl").write_text("x"))
attempt("write its own files", lambda: (job / "mine.txt").write_text("ok"))
(job / "probe.json").write_text(json.dumps(seen))
"""


@pytest.fixture()
def work() -> Iterator[Path]:
    """A work folder trainers can reach (pytest's own tmp is 0700 to root, as a runner's home would not be)."""
    root = Path(tempfile.mkdtemp(prefix="kiln-sandbox-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_a_trainer_runs_as_its_slots_uid_and_reaches_nothing_of_the_runner(bus, nats_server, work: Path) -> None:
    nc, js, log = bus
    secret = work / "runner-secret.creds"
    secret.write_text("SUAM...")
    secret.chmod(0o600)
    dataset = work / "ds"
    dataset.mkdir()
    (dataset / "data.yaml").write_text("path: .\ntrain: images\nval: images\nnames: {0: a}\n")
    other = work / "runners" / "r" / "jobs" / "earlier-1"  # an earlier attempt's folder, as the runner leaves it
    other.mkdir(parents=True)
    other.chmod(0o1770)
    os.chown(other, -1, BASE + 1)
    runner = RunnerProc(nats_server.url, work / "runners", "r", work / "fake.log", slots=1, data_roots=[work],
                        trainer_cmd=[str(SYSTEM_PYTHON), "-c", PROBE], trainer_uid_base=BASE,
                        trainer_env={"RUNNER_SECRET": str(secret), "OTHER_ATTEMPT": str(other)})
    try:
        await runner.ready()
        await publish_start(js, "boxed", spec(str(dataset), seconds=1))
        await log.wait(lambda: log.finished("boxed"), timeout=30)
        assert log.finished("boxed")[0].data.status.value == "completed", log.finished("boxed")[0].data
    finally:
        runner.stop()
    job_dir = work / "runners" / "r" / "jobs" / "boxed-1"
    seen = json.loads((job_dir / "probe.json").read_text())
    assert (seen["uid"], seen["gid"], seen["groups"], seen["home"]) == (BASE, BASE, [], str(job_dir))
    assert {k: v for k, v in seen.items() if k not in ("uid", "gid", "groups", "home")} == {
        "read the runner's secret": "PermissionError",
        "read another attempt's folder": "PermissionError",
        "delete job.json": "PermissionError",
        "rewrite job.json": "PermissionError",
        "write into the runner's spool": "PermissionError",
        "write its own files": "done",
    }
    mode = job_dir.stat()
    assert (mode.st_uid, mode.st_gid, stat.S_IMODE(mode.st_mode)) == (0, BASE, 0o1770)
    assert json.loads((job_dir / "job.json").read_text())["job_id"] == "boxed"


def test_a_runner_that_cannot_switch_users_refuses_to_start(tmp_path: Path) -> None:
    from kiln_runner.adapters.sandbox import SandboxError, TrainerUsers

    with pytest.raises(SandboxError, match="at or above 1000"):
        TrainerUsers.checked(0, 1)
    if os.fork() == 0:  # a child that gives up root, as a runner started by a plain user would be
        os.setuid(65534)
        try:
            TrainerUsers.checked(BASE, 1)
        except SandboxError as exc:
            os._exit(0 if "needs the runner to run as root" in str(exc) else 2)
        os._exit(1)
    _, status = os.wait()
    assert os.waitstatus_to_exitcode(status) == 0
