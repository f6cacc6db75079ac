"""Kiln: report Ultralytics trainings without editing the training script, in DDP workers too.

The Kiln runner puts this folder first on the trainer's ``PYTHONPATH``; every Python process of the job (the
training script, the ``torch.distributed.run`` workers Ultralytics spawns for multi-GPU training) then runs this
file at start-up.  When enabled (see ``kiln_sdk.integrations.ultralytics_autoload``) it installs an import hook that
registers Kiln's callbacks in every Ultralytics trainer; it costs a few environment reads otherwise.  Any other
``sitecustomize`` on the path is run afterwards, as if this one were not there.
"""

import importlib.util
import os
import sys


def _kiln_boot() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    finder = os.path.join(os.path.dirname(here), "integrations", "_ultralytics_finder.py")
    spec = importlib.util.spec_from_file_location("_kiln_ultralytics_finder", finder)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if module.enabled():
        module.install()


def _chain() -> None:
    """Run the ``sitecustomize`` this one shadows (e.g. a distribution's), if there is one."""
    from importlib.machinery import PathFinder

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None or spec.origin == os.path.abspath(__file__):
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


try:
    _kiln_boot()
except Exception as exc:  # noqa: BLE001 - never stop an interpreter from starting
    print(f"kiln_sdk: Ultralytics autoload not installed: {exc!r}", file=sys.stderr)
try:
    _chain()
except Exception as exc:  # noqa: BLE001
    print(f"kiln_sdk: chained sitecustomize failed: {exc!r}", file=sys.stderr)
