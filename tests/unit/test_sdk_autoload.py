"""Ultralytics autoload: the runner's PYTHONPATH hook registers Kiln's callbacks in every trainer, DDP workers too.

Start-up behaviour is checked in subprocesses against a stand-in ``ultralytics`` package (the real one takes
seconds to import); the patch itself against the real Ultralytics, building a trainer the way its DDP worker file
does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kiln_sdk.integrations import ultralytics as kiln_ul
from kiln_sdk.integrations.ultralytics_autoload import boot_dir, patch, pythonpath

STANDIN = {
    "ultralytics/__init__.py": "",
    "ultralytics/utils/__init__.py": "",
    "ultralytics/utils/callbacks/__init__.py": "from .base import add_integration_callbacks\n",
    "ultralytics/utils/callbacks/base.py": textwrap.dedent("""
        def add_integration_callbacks(instance):  # like the real one: each callback once
            own = instance.callbacks.setdefault("on_train_start", [])
            if "ultralytics-own" not in own:
                own.append("ultralytics-own")
    """),
}
PROBE = textwrap.dedent("""
    from ultralytics.utils import callbacks

    class DetectionTrainer:
        def __init__(self):
            self.callbacks = {}
        def add_callback(self, event, fn):
            self.callbacks.setdefault(event, []).append(fn)

    t = DetectionTrainer()
    callbacks.add_integration_callbacks(t)
    callbacks.add_integration_callbacks(t)  # twice: still registered once
    print(sorted(k for k, v in t.callbacks.items() if any(getattr(f, "__module__", "").startswith("kiln_sdk")
                                                             for f in v)),
          sum(len(v) for v in t.callbacks.values()))
""")


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("standin")
    for rel, text in STANDIN.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def probe(standin: Path, extra_path: list[Path] | None = None, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    path = os.pathsep.join(str(p) for p in [standin, *(extra_path or [])])
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env, "PYTHONPATH": pythonpath(path)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_boot_dir_holds_only_sitecustomize() -> None:
    assert sorted(p.name for p in boot_dir().iterdir() if p.suffix == ".py") == ["sitecustomize.py"]
    assert pythonpath("/a").split(os.pathsep) == [str(boot_dir()), "/a"]


def test_inside_a_kiln_job_every_trainer_gets_the_kiln_callbacks_once(standin: Path) -> None:
    kiln_hooks = sorted(kiln_ul.callbacks)
    assert probe(standin, KILN_JOB_ID="j1") == f"{kiln_hooks} {len(kiln_hooks) + 1}"
    assert probe(standin, KILN_ULTRALYTICS="1") == f"{kiln_hooks} {len(kiln_hooks) + 1}"  # outside Kiln, asked


def test_off_outside_kiln_or_when_switched_off(standin: Path) -> None:
    assert probe(standin) == "[] 1"
    assert probe(standin, KILN_JOB_ID="j1", KILN_ULTRALYTICS="0") == "[] 1"


def test_a_shadowed_sitecustomize_still_runs(standin: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    mark = tmp_path / "ran"
    (other / "sitecustomize.py").write_text(f"open({str(mark)!r}, 'w').write('yes')\n")
    probe(standin, [other], KILN_JOB_ID="j1")
    assert mark.read_text() == "yes"


def test_patch_adds_callbacks_to_a_trainer_built_like_a_ddp_worker(tmp_path: Path, monkeypatch) -> None:
    """Ultralytics' DDP worker file rebuilds the trainer from the launcher's args and callbacks: the patched
    add_integration_callbacks runs in its __init__ and Kiln's callbacks end up registered exactly once."""
    pytest.importorskip("ultralytics")
    from kiln_local.synth import make_classification_dataset
    from ultralytics.models.yolo.classify import ClassificationTrainer
    from ultralytics.utils import DEFAULT_CFG_DICT, callbacks
    from ultralytics.utils.callbacks import base

    monkeypatch.setattr(base, "add_integration_callbacks", base.add_integration_callbacks)  # restored after
    monkeypatch.setattr(callbacks, "add_integration_callbacks", callbacks.add_integration_callbacks)
    patch(callbacks)
    patch(callbacks)  # idempotent
    assert callbacks.add_integration_callbacks is base.add_integration_callbacks

    data = make_classification_dataset(tmp_path / "data", n_train=4, n_val=2)
    args = {"model": "yolov8n-cls.yaml", "data": str(data), "device": "cpu", "epochs": 1, "imgsz": 32,
            "project": str(tmp_path), "name": "t", "exist_ok": True, "plots": False}
    launcher_callbacks = callbacks.get_default_callbacks()
    kiln_ul.add_kiln_callbacks(type("M", (), {"callbacks": launcher_callbacks, "add_callback":
                                              lambda self, e, f: launcher_callbacks[e].append(f)})())
    cfg = DEFAULT_CFG_DICT.copy()
    cfg.update(save_dir="")
    trainer = ClassificationTrainer(cfg=cfg, overrides=args, _callbacks=launcher_callbacks)
    for event, fn in kiln_ul.callbacks.items():
        assert trainer.callbacks[event].count(fn) == 1, event
