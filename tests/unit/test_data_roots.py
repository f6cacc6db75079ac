"""The data-roots rule (kiln_contracts.data_roots, used by the runner and the trainer) on real folders and symlinks;
the runner's roots setting; the trainer's environment, whose names no job string can choose."""

import doctest
import json
import os

import pytest

from kiln_contracts import StartJob
from kiln_contracts import data_roots
from kiln_runner.adapters.datasets import Resolved, resolve_local
from kiln_runner.jobs import RunningJob
from kiln_runner.settings import Settings



def test_docstring_examples():
    assert doctest.testmod(data_roots).failed == 0


@pytest.fixture()
def rule():
    return data_roots


@pytest.fixture()
def world(tmp_path):
    """``root`` (the only data root) and ``out`` beside it, with a valid detection dataset in each."""
    root, out = tmp_path / "root", tmp_path / "out"
    for base in (root, out):
        for sub in ("images/train", "labels/train"):
            (base / "ds" / sub).mkdir(parents=True)
        (base / "ds" / "images" / "train" / "a.jpg").write_bytes(b"jpg")
        (base / "ds" / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.1 0.1\n")
        (base / "ds" / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/train\nnames: {0: a}\n")
        (base / "w.pt").write_bytes(b"weights")
    return root, out, data_roots.real_roots([root])


def refused(fn, *args) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args)
    assert type(info.value).__name__ == "PathRefused"
    return str(info.value)


def test_a_dataset_inside_the_roots_passes(rule, world):
    root, _, roots = world
    rule.check_dataset(str(root / "ds" / "data.yaml"), roots)
    (root / "shared").symlink_to(root / "ds")  # a link that stays inside is fine
    rule.check_dataset(str(root / "shared" / "data.yaml"), roots)


@pytest.mark.parametrize("case", ["outside", "dotdot", "linked folder", "linked yaml", "path entry", "train entry",
                                  "linked image", "linked labels", "image list", "relative list line"])
def test_a_dataset_that_reads_outside_the_roots_is_refused(rule, world, case):
    root, out, roots = world
    ds = root / "ds"
    data = ds / "data.yaml"
    if case == "outside":
        data = out / "ds" / "data.yaml"
    elif case == "dotdot":
        data = root / ".." / "out" / "ds" / "data.yaml"
    elif case == "linked folder":
        (root / "link").symlink_to(out / "ds")
        data = root / "link" / "data.yaml"
    elif case == "linked yaml":
        data.unlink()
        data.symlink_to(out / "ds" / "data.yaml")
    elif case == "path entry":
        data.write_text(f"path: {out / 'ds'}\ntrain: images/train\nval: images/train\nnames: [a]\n")
    elif case == "train entry":
        data.write_text(f"path: .\ntrain: {out / 'ds' / 'images' / 'train'}\nval: images/train\nnames: [a]\n")
    elif case == "linked image":
        (ds / "images" / "train" / "b.jpg").symlink_to(out / "ds" / "images" / "train" / "a.jpg")
    elif case == "linked labels":
        (ds / "labels" / "train" / "a.txt").unlink()
        (ds / "labels" / "train").rmdir()
        (ds / "labels" / "train").symlink_to(out / "ds" / "labels" / "train")
    elif case == "image list":
        (ds / "train.txt").write_text(f"./images/train/a.jpg\n{out / 'ds' / 'images' / 'train' / 'a.jpg'}\n")
        data.write_text("path: .\ntrain: train.txt\nval: images/train\nnames: [a]\n")
    elif case == "relative list line":
        (ds / "train.txt").write_text("images/train/a.jpg\n")
        data.write_text("path: .\ntrain: train.txt\nval: images/train\nnames: [a]\n")
    reason = refused(rule.check_dataset, str(data), roots)
    if case == "relative list line":
        assert "does not start with './'" in reason
    else:
        assert f"is outside the runner's data roots ({roots[0]})" in reason and "KILN_RUNNER_DATA_ROOTS" in reason


def test_an_image_list_inside_the_roots_passes(rule, world):
    root, _, roots = world
    ds = root / "ds"
    (ds / "train.txt").write_text(f"./images/train/a.jpg\n{ds / 'images' / 'train' / 'a.jpg'}\n")
    (ds / "data.yaml").write_text("path: .\ntrain: train.txt\nval: [images/train]\nnames: [a]\n")
    rule.check_dataset(str(ds / "data.yaml"), roots)


def test_a_symlink_loop_inside_the_roots_ends(rule, world):
    root, _, roots = world
    (root / "ds" / "images" / "train" / "loop").symlink_to(root / "ds")
    rule.check_dataset(str(root / "ds" / "data.yaml"), roots)


def test_model_files(rule, world, tmp_path):
    root, out, roots = world
    assert rule.model_file("yolov8n.yaml", roots, str(out)) is None  # shipped with Ultralytics: no file read
    assert rule.model_file(str(root / "w.pt"), roots, str(out)) == str(root / "w.pt")
    assert rule.model_file("w.pt", roots, str(root)) == str(root / "w.pt")  # relative: from the working folder
    (root / "evil.pt").symlink_to(out / "w.pt")
    (root / "cfg").symlink_to(out)
    for model in (str(out / "w.pt"), str(root / "evil.pt"), str(root / ".." / "out" / "w.pt"),
                  str(out / "missing.pt"), str(root / "cfg" / "my.yaml")):
        assert "is outside the runner's data roots" in refused(rule.model_file, model, roots, str(out)), model
    bare = refused(rule.model_file, "yolov8n.pt", roots, str(out))
    assert "a bare weights name" in bare and "never downloads" in bare and roots[0] in bare
    assert refused(rule.model_file, "missing.pt", roots, str(root)).startswith("model not found: missing.pt")
    assert refused(rule.model_file, str(root / "m.pt"), roots, str(out)) == f"model not found: {root / 'm.pt'}"


def test_no_roots_means_no_local_files(rule, world):
    root, _, _ = world
    assert "(none configured)" in refused(rule.check_dataset, str(root / "ds"), ())
    assert rule.model_file("yolov8n.yaml", (), str(root)) is None


def test_the_runner_refuses_before_it_looks(world):
    root, out, roots = world
    with pytest.raises(data_roots.PathRefused, match="outside the runner's data roots"):
        resolve_local(str(out / "nope"), "detect", roots)  # not "dataset not found": nothing is told about outside
    assert resolve_local(str(root / "ds"), "detect", roots).data == root / "ds" / "data.yaml"


def test_the_roots_setting(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KILN_RUNNER_DATA_ROOTS", raising=False)
    assert Settings(work_dir=tmp_path / "w").roots == (str((tmp_path / "w").resolve()),)  # default: work folder
    (tmp_path / "a").symlink_to(tmp_path / "real")
    for value in (f"{tmp_path / 'a'}, /data,", json.dumps([str(tmp_path / "a"), "/data"])):
        monkeypatch.setenv("KILN_RUNNER_DATA_ROOTS", value)
        assert Settings().roots == (str((tmp_path / "real").resolve()), "/data")
    monkeypatch.setenv("KILN_RUNNER_DATA_ROOTS", "")
    assert Settings().roots == ()  # explicitly none: s3:// datasets and shipped model YAMLs only


HOSTILE = "LD_PRELOAD=/tmp/x.so --trainer-cmd=/bin/sh; $(touch /tmp/pwned)"


def test_no_job_string_becomes_an_environment_name_or_a_command(tmp_path, monkeypatch):
    monkeypatch.delenv("KILN_MODEL", raising=False)
    settings = Settings(work_dir=tmp_path / "w", data_roots=[tmp_path])
    model = tmp_path / f"{HOSTILE}.pt".replace("/", "_")
    cmd = StartJob.model_validate({"job_id": "j", "spec": {"name": HOSTILE, "model": str(model),
                                                          "dataset": str(tmp_path / "ds")}})
    job = RunningJob(cmd, settings, js=None, slot=0)  # type: ignore[arg-type]
    job.model_path = str(model)
    env = job._env(Resolved(data=tmp_path / "ds" / "data.yaml", snapshot="0" * 64, files=1, cached=False))
    fixed = {"KILN_JOB_ID", "KILN_PROJECT", "KILN_ATTEMPT", "KILN_NATS_URL", "KILN_JOB_DIR", "KILN_JOB_SPEC",
             "KILN_DATASET", "KILN_SPOOL_DIR", "PYTHONUNBUFFERED", "CUDA_VISIBLE_DEVICES", "PYTHONPATH",
             "KILN_DATA_ROOTS", "KILN_MODEL"}
    assert set(env) <= set(os.environ) | fixed
    assert [k for k, v in env.items() if HOSTILE in v] == []  # the job's name goes nowhere
    assert env["KILN_MODEL"] == str(model) and json.loads(env["KILN_DATA_ROOTS"]) == [str(tmp_path.resolve())]


def test_the_trainer_may_also_read_what_its_runner_fetched_for_the_attempt(tmp_path):
    settings = Settings(work_dir=tmp_path / "w", data_roots=[tmp_path / "root"])
    job = RunningJob(StartJob.model_validate({"job_id": "j", "spec": {"model": "yolov8n.yaml",
                                                                      "dataset": "s3://b/shapes"}}),
                     settings, js=None, slot=0)  # type: ignore[arg-type]
    job.resume_path = tmp_path / "w" / "jobs" / "j-2" / "resume" / "resume-epoch3.pt"
    snapshot = tmp_path / "w" / "datasets" / ("a" * 64)
    roots = job._trainer_roots(Resolved(data=snapshot / "data.yaml", snapshot="a" * 64, files=2, cached=True))
    assert roots == [str(p.resolve()) for p in (tmp_path / "root", snapshot, job.resume_path.parent)]
