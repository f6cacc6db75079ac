"""Dataset resolution on the runner: local paths (S3 comes through the cache)."""

from __future__ import annotations

from pathlib import Path


class DatasetError(Exception):
    """The job's dataset cannot be used; the message is shown as the job's failure reason."""


def resolve_local(dataset: str, task: str) -> Path:
    """Return what Ultralytics gets as ``data=``: a data YAML (detect/segment/pose) or a folder (classify)."""
    path = Path(dataset).expanduser()
    if not path.exists():
        raise DatasetError(f"dataset not found: {dataset}")
    if task == "classify":
        if not path.is_dir():
            raise DatasetError(f"classification dataset must be a folder with train/ and val/: {dataset}")
        return path.resolve()
    if path.is_dir():
        for name in ("data.yaml", "data.yml", "dataset.yaml"):
            if (path / name).is_file():
                return (path / name).resolve()
        raise DatasetError(f"dataset folder has no data.yaml: {dataset}")
    if path.suffix not in (".yaml", ".yml"):
        raise DatasetError(f"dataset must be a data YAML or a folder holding data.yaml: {dataset}")
    return path.resolve()
