"""The dataset YAML as Ultralytics will see it: nothing in it can make the trainer run or download anything.

Ultralytics' ``check_det_dataset`` acts on a data YAML's ``download:`` entry when a split is missing: a URL is
downloaded, ``bash ...`` is run and anything else is passed to ``exec()``. A dataset comes from whoever can write
to a bucket, so Kiln hands Ultralytics a checked copy instead of the original:

* ``download:`` is removed (and reported in the job's log);
* ``path:`` becomes absolute, a relative one taken from the YAML's own folder (not the trainer's working folder or
  Ultralytics' datasets folder);
* ``train`` and ``val`` must name files or folders that exist, else the job fails with the split it lacks;
* Ultralytics' own auto-download is switched off as well (:func:`forbid_downloads`), in case a later version
  finds another way to ask for one.

Under a runner, before the copy is written, ``path:`` and every split (the folders, the images an image list names,
the symlinks in them) must lie under the runner's data roots: :func:`kiln_contracts.data_roots.check_dataset`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REMOVED_KEYS = ("download",)
REQUIRED_SPLITS = ("train", "val")


class DatasetRejected(ValueError):
    """The data YAML cannot be used as it is; the message says why."""


def _split_paths(root: Path, entry: Any, key: str) -> list[Path]:
    items = entry if isinstance(entry, list) else [entry]
    if not items or not all(isinstance(x, str) and x.strip() for x in items):
        raise DatasetRejected(f"'{key}:' must be a path or a list of paths, not {entry!r}")
    return [(root / x).resolve() for x in items]


def checked_copy(source: Path, dest_dir: Path, say: Any = print) -> Path:
    """Write the checked copy of the data YAML ``source`` into ``dest_dir``; returns its path.

    Raises:
        DatasetRejected: unreadable YAML, not a mapping, or a missing ``train``/``val`` split.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); (d / "images").mkdir()
        >>> _ = (d / "data.yaml").write_text("train: images\\nval: images\\nnames: [a]\\ndownload: import os\\n")
        >>> out = yaml.safe_load(checked_copy(d / "data.yaml", d / "job", say=lambda _: None).read_text())
        >>> "download" in out, out["path"] == str(d.resolve())
        (False, True)
    """
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DatasetRejected(f"unreadable data YAML: {' '.join(str(exc).split())[:200]}") from exc
    if not isinstance(data, dict):
        raise DatasetRejected("the data YAML is not a mapping of keys to values")
    for key in REMOVED_KEYS:
        if key in data:
            data.pop(key)
            say(f"kiln: the dataset's '{key}:' entry is ignored: Kiln never runs or downloads what a dataset describes")
    raw_root = data.get("path")
    if raw_root is not None and not isinstance(raw_root, str):
        raise DatasetRejected(f"'path:' must be a folder, not {raw_root!r}")
    root = Path(raw_root) if raw_root else source.parent
    if not root.is_absolute():
        root = source.parent / root
    root = root.resolve()
    data["path"] = str(root)
    if "val" not in data and "validation" in data:
        data["val"] = data.pop("validation")
    for key in REQUIRED_SPLITS:
        if not data.get(key):
            raise DatasetRejected(f"the data YAML has no '{key}:' split (train and val are both required)")
        missing = [p for p in _split_paths(root, data[key], key) if not p.exists()]
        if missing:
            raise DatasetRejected(f"the '{key}' split {missing[0]} does not exist")
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / "data.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return out


def forbid_downloads() -> None:
    """Make Ultralytics' dataset check refuse to download (its ``autodownload`` defaults to off)."""
    from ultralytics.data import utils

    fn = utils.check_det_dataset
    names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
    if fn.__defaults__ and "autodownload" in names:
        defaults = list(fn.__defaults__)
        defaults[names.index("autodownload") - (len(names) - len(defaults))] = False
        fn.__defaults__ = tuple(defaults)
