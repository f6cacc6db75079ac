"""Import hook that patches Ultralytics as soon as ``ultralytics.utils.callbacks`` is imported.

Self-contained on purpose (standard library only, no package-relative imports): the ``sitecustomize`` of
``kiln_sdk/_boot`` loads this file by path at interpreter start, without importing ``kiln_sdk`` (about 0.3 s) in
every Python process of a job.  ``kiln_sdk`` is imported only when Ultralytics is.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
from typing import Any

TARGET = "ultralytics.utils.callbacks"


def enabled(env: Any = None) -> bool:
    """``KILN_ULTRALYTICS=1``, or inside a Kiln job (``KILN_JOB_ID``) unless ``KILN_ULTRALYTICS=0``."""
    env = os.environ if env is None else env
    mode = env.get("KILN_ULTRALYTICS", "")
    return mode == "1" or (mode != "0" and bool(env.get("KILN_JOB_ID")))


def _patch(module: Any) -> None:
    try:
        from kiln_sdk.integrations.ultralytics_autoload import patch

        patch(module)
    except Exception as exc:  # noqa: BLE001 - reporting must never stop training
        print(f"kiln_sdk: Ultralytics autoload failed: {exc!r}", file=sys.stderr, flush=True)


class KilnUltralyticsFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of :data:`TARGET` so that the module is patched once loaded."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module

        def exec_module(module: Any) -> None:
            original(module)
            _patch(module)

        loader.exec_module = exec_module  # this loader object serves this one module only
        return spec


def install() -> None:
    """Patch now when Ultralytics' callbacks are already imported, else when they are (idempotent)."""
    if TARGET in sys.modules:
        _patch(sys.modules[TARGET])
    elif not any(type(f).__name__ == "KilnUltralyticsFinder" for f in sys.meta_path):
        sys.meta_path.insert(0, KilnUltralyticsFinder())
