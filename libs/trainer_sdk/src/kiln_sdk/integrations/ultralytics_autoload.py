"""Kiln reporting for any Ultralytics training script, with no change to the script (DDP workers included).

How it is activated: the Kiln runner prepends :func:`boot_dir` to the trainer's ``PYTHONPATH``.  That folder holds
only a ``sitecustomize.py``, which Python runs at start-up in every process of the job: the user's script and the
``torch.distributed.run`` workers Ultralytics starts for multi-GPU training (they inherit the environment).  When
:func:`enabled` (inside a Kiln job, ``KILN_JOB_ID`` set, unless ``KILN_ULTRALYTICS=0``; anywhere with
``KILN_ULTRALYTICS=1``) it installs an import hook; once ``ultralytics.utils.callbacks`` is imported, :func:`patch`
wraps ``add_integration_callbacks``, which every Ultralytics trainer calls on rank 0 (in a DDP worker too: the
launching process does not train, and callbacks added to it are not what a worker runs).  The wrapper adds
:data:`kiln_sdk.integrations.ultralytics.callbacks` to the trainer; the callbacks report from rank 0 only.

Works for every task (detect, segment, classify, pose, obb): the callbacks report whatever loss items, learning rates
and validation metrics the trainer has.

Outside Kiln, a launcher can do the same by setting ``PYTHONPATH`` itself, or a script can call :func:`install`.

Example::

    PYTHONPATH=$(python -c "from kiln_sdk.integrations.ultralytics_autoload import boot_dir; print(boot_dir())") \
        KILN_ULTRALYTICS=1 KILN_SDK_FILE=events.jsonl python train.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._ultralytics_finder import enabled, install

__all__ = ["boot_dir", "enabled", "install", "patch", "pythonpath"]


def boot_dir() -> Path:
    """The folder to put first on a trainer's ``PYTHONPATH`` (it holds only ``sitecustomize.py``)."""
    return Path(__file__).resolve().parents[1] / "_boot"


def pythonpath(current: str | None) -> str:
    """``current`` (a ``PYTHONPATH`` value, may be empty) with :func:`boot_dir` first."""
    import os

    return os.pathsep.join([str(boot_dir()), *([current] if current else [])])


def patch(callbacks_module: Any = None) -> None:
    """Make Ultralytics' ``add_integration_callbacks`` also register Kiln's callbacks on trainers (idempotent)."""
    import importlib

    base = importlib.import_module("ultralytics.utils.callbacks.base")
    package = callbacks_module or importlib.import_module("ultralytics.utils.callbacks")
    original = base.add_integration_callbacks
    if getattr(original, "_kiln", False):
        return

    def add_integration_callbacks(instance: Any) -> None:
        original(instance)
        if "Trainer" in type(instance).__name__:
            from .ultralytics import add_kiln_callbacks

            add_kiln_callbacks(instance)

    add_integration_callbacks._kiln = True  # type: ignore[attr-defined]
    add_integration_callbacks.__doc__ = original.__doc__
    base.add_integration_callbacks = add_integration_callbacks
    package.add_integration_callbacks = add_integration_callbacks
