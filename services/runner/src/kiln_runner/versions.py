"""Versions recorded with every job, read from package metadata without importing torch (fast)."""

from __future__ import annotations

import functools
import importlib.metadata as md
import importlib.util
import re
from pathlib import Path


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _torch_cuda() -> str | None:
    spec = importlib.util.find_spec("torch")
    if not spec or not spec.origin:
        return None
    vfile = Path(spec.origin).parent / "version.py"
    if not vfile.exists():
        return None
    m = re.search(r"^cuda(?::\s*\S+)?\s*=\s*['\"]?([^'\"\n]+)['\"]?", vfile.read_text(), re.M)
    return None if not m or m.group(1) == "None" else m.group(1)


@functools.cache
def versions() -> dict[str, str | None]:
    return {"kiln": _version("kiln-runner"), "ultralytics": _version("ultralytics"), "torch": _version("torch"),
            "torchvision": _version("torchvision"), "cuda": _torch_cuda()}
