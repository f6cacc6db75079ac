"""A job reads only under its runner's data roots: real runner processes on real NATS JetStream, the stand-in
trainer (it notes every start in its log, so "nothing spawned" is checked), symlinks, and a `.pt` whose unpickling
would create a marker file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from kiln_contracts import ExitClass, JobStatus, streams, subjects
from kiln_testing.runners import EventLog, RunnerProc, evil_pt, publish_start, read_fake_log, spec

DATA_YAML = "path: .\ntrain: images/train\nval: images/train\nnames: {0: a}\n"
RULE = "is outside the runner's data roots ({root}): a job may only read files under them (KILN_RUNNER_DATA_ROOTS)"
SHOW_ENV = ("import json, os; open(os.environ['FAKE_LOG'] + '.env', 'a').write(json.dumps({k: os.environ.get(k) "
            "for k in ('KILN_JOB_ID', 'KILN_MODEL', 'KILN_DATA_ROOTS', 'KILN_DATASET')}) + '\\n')")
"""A trainer that notes what its runner handed it."""


def make_dataset(folder: Path) -> Path:
    (folder / "images" / "train").mkdir(parents=True)
    (folder / "images" / "train" / "a.jpg").write_bytes(b"jpg")
    (folder / "data.yaml").write_text(DATA_YAML)
    return folder


def shown_env(fake_log: Path) -> dict[str, dict]:
    lines = fake_log.with_name(fake_log.name + ".env").read_text().splitlines()
    return {env["KILN_JOB_ID"]: env for env in map(json.loads, lines)}


@pytest.fixture()
def world(tmp_path):
    """``root``: the runner's only data root, with a dataset; ``out``: beside it, with another."""
    root, out = tmp_path / "root", tmp_path / "out"
    make_dataset(root / "ds")
    make_dataset(out / "ds")
    return root, out


async def refused(log, jobs: list[str]) -> dict[str, str]:
    """Each job ended failed (user error) without a trainer ever running; returns the reasons."""
    await log.wait(lambda: all(log.finished(j) for j in jobs), timeout=30)
    reasons = {}
    for j in jobs:
        [fin] = log.finished(j)
        assert (fin.data.status, fin.data.exit_class, fin.data.exit_code) == (
            JobStatus.failed, ExitClass.user_error, None), (j, fin.data)
        assert not [e for e in log.of(j, "status") if e.data.status == JobStatus.running], j
        reasons[j] = fin.data.reason
    return reasons


async def test_a_dataset_that_leads_out_of_the_roots_fails_before_anything_is_spawned(bus, runners, world, tmp_path):
    nc, js, log = bus
    root, out = world
    (root / "link").symlink_to(out / "ds")
    make_dataset(root / "linked-yaml")
    (root / "linked-yaml" / "data.yaml").unlink()
    (root / "linked-yaml" / "data.yaml").symlink_to(out / "ds" / "data.yaml")
    make_dataset(root / "path-out")
    (root / "path-out" / "data.yaml").write_text(DATA_YAML.replace("path: .", f"path: {out / 'ds'}"))
    make_dataset(root / "linked-image")
    (root / "linked-image" / "images" / "train" / "b.jpg").symlink_to(out / "ds" / "images" / "train" / "a.jpg")
    cases = {"outside": str(out / "ds"), "relative": "tests/fixtures",  # taken from the runner's working folder
             "linked-folder": str(root / "link"), "linked-yaml": str(root / "linked-yaml"),
             "path-entry": str(root / "path-out"), "linked-image": str(root / "linked-image")}
    runners("a", data_roots=[root]).wait_ready()
    for job, dataset in cases.items():
        await publish_start(js, job, spec(dataset))
    await publish_start(js, "inside", spec(str(root / "ds")))  # the control: this one the same runner runs
    reasons = await refused(log, list(cases))
    await log.wait(lambda: log.finished("inside"), timeout=30)
    assert log.finished("inside")[0].data.status == JobStatus.completed
    assert [row[1] for row in read_fake_log(tmp_path / "fake.log")] == ["inside", "inside"]  # start, end: only it
    rule = RULE.format(root=root.resolve())
    assert all(rule in reason for reason in reasons.values()), reasons
    assert reasons["outside"].startswith(f"dataset {out / 'ds'} is outside")
    assert reasons["linked-folder"].startswith(f"dataset {root / 'link'} (it resolves to {out / 'ds'}) is outside")
    assert f"(it resolves to {out / 'ds' / 'data.yaml'})" in reasons["linked-yaml"]
    assert reasons["path-entry"].startswith(f"the 'path:' entry of dataset {root / 'path-out' / 'data.yaml'}")
    assert f"the symlink {root / 'linked-image' / 'images' / 'train' / 'b.jpg'} (it resolves to" in \
        reasons["linked-image"]


async def test_a_pt_outside_the_roots_is_refused_and_never_unpickled(bus, runners, world, tmp_path):
    nc, js, log = bus
    root, out = world
    control = tmp_path / "control-marker"
    payload = evil_pt(tmp_path / "control.pt", control)
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(payload)!r}, 'rb'))"], check=True)
    assert control.exists(), "the payload does not work: this test would prove nothing"
    marker = tmp_path / "pwned"
    evil = evil_pt(out / "evil.pt", marker)
    (root / "evil.pt").symlink_to(evil)
    cases = {"outside": str(evil), "linked": str(root / "evil.pt"), "bare": "evil.pt", "bare-known": "yolov8n.pt"}
    runners("a", data_roots=[root]).wait_ready()
    for job, model in cases.items():
        await publish_start(js, job, spec(str(root / "ds"), model=model))
    reasons = await refused(log, list(cases))
    assert read_fake_log(tmp_path / "fake.log") == [], "a trainer was started"
    assert not marker.exists(), "the .pt was unpickled"
    rule = RULE.format(root=root.resolve())
    assert reasons["outside"] == f"model {evil} {rule}"
    assert reasons["linked"] == f"model {root / 'evil.pt'} (it resolves to {evil}) {rule}"
    for job in ("bare", "bare-known"):
        assert "a bare weights name is looked for in the runner's working folder" in reasons[job], reasons[job]
        assert f"({root.resolve()}); Kiln never downloads weights" in reasons[job]


async def test_a_pt_inside_the_roots_reaches_the_trainer_with_the_roots(bus, runners, world, tmp_path):
    nc, js, log = bus
    root, _ = world
    weights = root / "models" / "best.pt"
    weights.parent.mkdir()
    weights.write_bytes(b"weights")
    (root / "latest.pt").symlink_to(weights)  # a link that stays inside the roots is fine
    runners("a", data_roots=[root], trainer_cmd=[sys.executable, "-c", SHOW_ENV]).wait_ready()
    await publish_start(js, "pt", spec(str(root / "ds"), model=str(weights)))
    await publish_start(js, "linked-pt", spec(str(root / "ds"), model=str(root / "latest.pt")))
    await publish_start(js, "shipped", spec(str(root / "ds"), model="yolov8n.yaml"))
    await log.wait(lambda: all(log.finished(j) for j in ("pt", "linked-pt", "shipped")), timeout=30)
    assert {j: log.finished(j)[0].data.status for j in ("pt", "linked-pt", "shipped")} == dict.fromkeys(
        ("pt", "linked-pt", "shipped"), JobStatus.completed)
    env = shown_env(tmp_path / "fake.log")
    assert (env["pt"]["KILN_MODEL"], env["linked-pt"]["KILN_MODEL"]) == (str(weights), str(root / "latest.pt"))
    assert env["shipped"]["KILN_MODEL"] is None  # Ultralytics builds it from its own YAML: no file named
    assert json.loads(env["pt"]["KILN_DATA_ROOTS"]) == [str(root.resolve())]  # the trainer checks them again


async def test_a_start_command_cannot_bring_its_own_environment_or_command(bus, runners, world, tmp_path):
    """The spec forbids unknown keys (the job fails with the cause); the command's own extra keys are ignored."""
    nc, js, log = bus
    root, _ = world
    marker = tmp_path / "pwned"
    shell = ["/bin/sh", "-c", f"touch {marker}"]
    extra = {"env": {"LD_PRELOAD": str(tmp_path / "evil.so"), "PATH": str(tmp_path)}, "command": shell,
             "trainer_cmd": shell}
    runners("a", data_roots=[root]).wait_ready()
    base = spec(str(root / "ds")).model_dump(mode="json")
    for key, value in extra.items():
        body = {"v": 1, "job_id": f"spec-{key}", "attempt": 1, "spec": {**base, key: value}}
        await js.publish(subjects.start("default"), json.dumps(body).encode(), headers={"Nats-Msg-Id": f"spec-{key}:1"})
    reasons = await refused(log, [f"spec-{key}" for key in extra])
    for key in extra:
        assert reasons[f"spec-{key}"] == f"invalid start command: spec.{key}: Extra inputs are not permitted"
    assert read_fake_log(tmp_path / "fake.log") == []
    body = {"v": 1, "job_id": "top", "attempt": 1, "spec": base, **extra}
    await js.publish(subjects.start("default"), json.dumps(body).encode(), headers={"Nats-Msg-Id": "top:1"})
    await log.wait(lambda: log.finished("top"), timeout=30)
    assert log.finished("top")[0].data.status == JobStatus.completed
    assert [row[1] for row in read_fake_log(tmp_path / "fake.log")] == ["top", "top"]  # the runner's own trainer
    assert not marker.exists()


@pytest.fixture()
async def s3_world(nats_server, tmp_path, s3, monkeypatch, world):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    client = s3.client()
    client.create_bucket(Bucket="paths")
    for name, text in (("good", DATA_YAML), ("evil", DATA_YAML.replace("train: images/train", "train: /etc"))):
        client.put_object(Bucket="paths", Key=f"{name}/images/train/a.jpg", Body=b"jpg")
        client.put_object(Bucket="paths", Key=f"{name}/data.yaml", Body=text.encode())
    root, _ = world
    runner = RunnerProc(nats_server.url, tmp_path / "runners", "s3", tmp_path / "fake.log", data_roots=[root],
                        trainer_cmd=[sys.executable, "-c", SHOW_ENV], s3_endpoint_url=s3.url,
                        s3_allowed_buckets=["paths"])
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await streams.ensure_streams(js)
    log = await EventLog().start(js)
    runner.wait_ready()
    yield js, log
    runner.stop()
    await nc.close()
    for obj in client.list_objects_v2(Bucket="paths").get("Contents", []):
        client.delete_object(Bucket="paths", Key=obj["Key"])
    client.delete_bucket(Bucket="paths")


async def test_an_s3_dataset_is_not_held_to_the_roots_but_to_its_own_folder(s3_world, world, tmp_path):
    js, log = s3_world
    root, _ = world
    await publish_start(js, "s3-good", spec("s3://paths/good"))
    await publish_start(js, "s3-evil", spec("s3://paths/evil"))
    await log.wait(lambda: log.finished("s3-good") and log.finished("s3-evil"), timeout=30)
    assert log.finished("s3-good")[0].data.status == JobStatus.completed  # its cache is outside the data roots
    [reason] = (await refused(log, ["s3-evil"])).values()
    assert reason.startswith("the 'train:' entry of dataset ") and "(/etc) is outside its downloaded folder (" in reason
    assert reason.endswith("a dataset from object storage may only name its own files"), reason
    env = shown_env(tmp_path / "fake.log")
    assert list(env) == ["s3-good"]
    snapshot = str(Path(env["s3-good"]["KILN_DATASET"]).parent)
    assert not snapshot.startswith(str(root)) and json.loads(env["s3-good"]["KILN_DATA_ROOTS"]) == [
        str(root.resolve()), snapshot]  # the trainer may read the downloaded snapshot too


@pytest.mark.e2e
async def test_a_real_checkpoint_inside_the_roots_trains(bus, runners, tmp_path):
    """The real trainer under a runner whose only root holds the dataset and the weights (not its work folder)."""
    from kiln_local.synth import make_detection_dataset

    nc, js, log = bus
    root = tmp_path / "root"
    data = make_detection_dataset(root / "ds", n_train=4, n_val=2, imgsz=64)
    weights = root / "models" / "tiny.pt"
    weights.parent.mkdir()
    subprocess.run([sys.executable, "-c", f"from ultralytics import YOLO; YOLO('yolov8n.yaml').save({str(weights)!r})"],
                   check=True, cwd=tmp_path, capture_output=True,
                   env={**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(tmp_path / "yolo")})
    runners("a", data_roots=[root], trainer_cmd=[sys.executable, "-m", "kiln_trainer_ultralytics"],
            trainer_env={"OMP_NUM_THREADS": "2"}).wait_ready()
    train = {"epochs": 1, "imgsz": 64, "batch": 4, "nbs": 4, "workers": 0, "warmup_epochs": 0, "plots": False}
    await publish_start(js, "real", spec(str(data.parent), model=str(weights), train=train))
    await log.wait(lambda: log.finished("real"), timeout=240)
    fin = log.finished("real")[0].data
    assert (fin.status, fin.exit_class) == (JobStatus.completed, ExitClass.ok), fin
