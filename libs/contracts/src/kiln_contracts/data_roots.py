"""Where a job may read on its runner: under the runner's data roots, judged after every symlink is resolved.

A job names a model and a dataset; the runner and its trainer read them with the runner's permissions, and loading a
``.pt`` unpickles it. So a job may only name files under the data roots (``KILN_RUNNER_DATA_ROOTS``; its trainer
gets them as ``KILN_DATA_ROOTS``). Checked:

* a local dataset (a folder or a data YAML) and the data YAML inside a folder;
* that YAML's ``path:`` and its ``train``/``val``/``test``/``minival`` entries, each image an image-list file names
  (and its label file), and the target of every symlink in the dataset's folder and in the folders the entries name
  (and their ``labels`` folders, found as Ultralytics finds them);
* a model file: anything but a bare model YAML name that Ultralytics ships (``yolov8n.yaml``), so every ``.pt``. A
  relative path is taken from the runner's working folder, as a relative dataset is; a bare ``yolov8n.pt`` is
  refused unless it is there and under a root: Ultralytics would try to download it.

The runner refuses before it spawns anything, the trainer again before Ultralytics opens anything: both use this
one module.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import yaml

ROOTS_ENV = "KILN_DATA_ROOTS"
SPLITS = ("train", "val", "test", "minival")
RUNNER_ROOTS = "the runner's data roots"
DOWNLOADED = "its downloaded folder"
_HINTS = {RUNNER_ROOTS: "a job may only read files under them (KILN_RUNNER_DATA_ROOTS)",
          DOWNLOADED: "a dataset from object storage may only name its own files"}
_IMAGES, _LABELS = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"


class PathRefused(ValueError):
    """A job named a file it may not read (or one that is not there); the message names the rule and the roots."""


def parse_roots(value: str) -> list[str]:
    """Roots as the environment gives them: a JSON list, or paths separated by commas.

    >>> parse_roots('["/data", "/models"]'), parse_roots(" /data, /models,"), parse_roots("")
    (['/data', '/models'], ['/data', '/models'], [])
    """
    text = value.strip()
    if text.startswith("["):
        items = json.loads(text)
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise ValueError(f"data roots must be a JSON list of paths, not {value!r}")
        return [x for x in items if x.strip()]
    return [x.strip() for x in text.split(",") if x.strip()]


def real_roots(roots: Iterable[str | os.PathLike[str]]) -> tuple[str, ...]:
    """Each root with its symlinks resolved (a root may itself be a link: its target is what is allowed)."""
    return tuple(dict.fromkeys(os.path.realpath(os.path.expanduser(r)) for r in roots))


def inside(real: str, roots: Iterable[str]) -> bool:
    """Whether the resolved path ``real`` is one of the resolved ``roots`` or lies below one.

    >>> inside("/data/ds/a.jpg", ["/data"]), inside("/data", ["/data"]), inside("/database/a", ["/data"])
    (True, True, False)
    >>> inside("/etc/passwd", ["/"]), inside("/data/a", [])
    (True, False)
    """
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def names_a_file(model: str) -> bool:
    """Whether a job's ``model`` names a file: anything but a bare model YAML name, which Ultralytics ships.

    >>> [names_a_file(m) for m in ("yolov8n.yaml", "yolov8n.pt", "cfg/my.yaml", "/m/best.pt", "~my.yml")]
    [False, True, True, True, True]
    """
    return "/" in model or model.startswith("~") or not model.endswith((".yaml", ".yml"))


def labels_folder(images: str) -> str | None:
    """The folder Ultralytics reads the labels of ``images`` from (its last ``images`` part becomes ``labels``).

    >>> labels_folder("/d/images/train"), labels_folder("/d/train") is None
    ('/d/labels/train', True)
    """
    head, sep, tail = (images.rstrip(os.sep) + os.sep).rpartition(_IMAGES)
    return (head + _LABELS + tail).rstrip(os.sep) if sep else None


def check(path: str, roots: tuple[str, ...], what: str, scope: str = RUNNER_ROOTS) -> str:
    """The resolved ``path`` when it lies under ``roots``, else :class:`PathRefused` naming ``what`` and the roots."""
    real = os.path.realpath(path)
    if inside(real, roots):
        return real
    via = "" if real == os.path.abspath(path) else f" (it resolves to {real})"
    listed = ", ".join(roots) if roots else "none configured"
    raise PathRefused(f"{what}{via} is outside {scope} ({listed}): {_HINTS.get(scope, _HINTS[RUNNER_ROOTS])}")


def model_file(model: str, roots: tuple[str, ...], base: str) -> str | None:
    """The file a job's ``model`` names, as the trainer must load it; ``None`` for a model YAML Ultralytics ships.

    A relative path is taken from ``base``. Raises :class:`PathRefused` when the file is outside the roots (whether
    it exists or not: nothing tells a job what lies outside) or is not there.
    """
    if not names_a_file(model):
        return None
    path = os.path.join(base, os.path.expanduser(model))
    bare = "/" not in model and model.endswith(".pt")
    try:
        check(path, roots, f"model {path}")
    except PathRefused as exc:
        if bare and not inside(os.path.realpath(base), roots):
            raise PathRefused(f"model {model}: a bare weights name is looked for in the runner's working folder "
                              f"({base}), which is outside {RUNNER_ROOTS} ({', '.join(roots) or 'none configured'}); "
                              "Kiln never downloads weights: name a .pt file under a data root") from exc
        raise
    if not os.path.isfile(path):
        raise PathRefused(f"model not found: {model}" + (f" (looked for {path}; weights are never downloaded)"
                                                         if bare else ""))
    return path


def check_dataset(data: str, roots: tuple[str, ...], scope: str = RUNNER_ROOTS) -> None:
    """Refuse a dataset (a class folder, or a data YAML) that would read anything outside ``roots``."""
    check(data, roots, f"dataset {data}", scope)
    if os.path.isdir(data):
        folders = [data]
    else:
        folders = [os.path.dirname(os.path.realpath(data))]
        for key, target in yaml_entries(data):
            real = check(target, roots, f"the '{key}:' entry of dataset {data} ({target})", scope)
            if key == "path":
                continue
            if os.path.isdir(real):
                folders.append(real)
                if (labels := labels_folder(real)) and os.path.lexists(labels):
                    folders.append(check(labels, roots, f"the labels of '{key}:' of dataset {data} ({labels})", scope))
            elif os.path.isfile(real):
                _check_image_list(real, roots, f"the '{key}' image list {target} of dataset {data}", scope)
    link = escaping_link(folders, roots)
    if link is not None:
        check(link, roots, f"dataset {data}: the symlink {link}", scope)


def yaml_entries(source: str) -> list[tuple[str, str]]:
    """``path`` and each split entry of a data YAML, joined as the trainer's checked copy and Ultralytics join them.

    A YAML that cannot be read is left to the trainer, which fails the job saying why.
    """
    try:
        with open(source, encoding="utf-8") as f:
            doc: Any = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    if not isinstance(doc, dict):
        return []
    folder = os.path.dirname(os.path.realpath(source))  # a linked YAML is read from its target's folder
    raw = doc.get("path")
    root = os.path.join(folder, raw) if isinstance(raw, str) and raw else folder
    out = [("path", root)]
    for key in SPLITS + ("validation",):
        entry = doc.get(key)
        for item in entry if isinstance(entry, list) else [entry]:
            if isinstance(item, str) and item.strip():
                out.append((key, os.path.join(root, item)))
    return out


def _check_image_list(listing: str, roots: tuple[str, ...], what: str, scope: str) -> None:
    """Each image an image-list file names, and its label file, as Ultralytics reads them."""
    try:
        with open(listing, encoding="utf-8-sig") as f:
            lines = f.read().strip().splitlines()
    except (OSError, UnicodeDecodeError):
        return  # Ultralytics cannot read it either: the job fails there
    parent = os.path.dirname(listing) + os.sep
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.startswith("./"):
            image = line.replace("./", parent, 1)
        elif os.path.isabs(line):
            image = line
        else:
            raise PathRefused(f"{what}, line {n}: {line!r} is relative but does not start with './' (relative to the "
                              "list): Ultralytics would read it from the trainer's working folder")
        check(image, roots, f"{what}, line {n} ({image})", scope)
        head, sep, tail = image.rpartition(_IMAGES)
        label = os.path.splitext(head + _LABELS + tail)[0] + ".txt" if sep else None
        if label and os.path.lexists(label):
            check(label, roots, f"{what}, the label file of line {n} ({label})", scope)


def escaping_link(folders: Iterable[str], roots: tuple[str, ...]) -> str | None:
    """The first symlink in ``folders`` (searched through, following links that stay in ``roots``) that leads out."""
    todo, seen = list(folders), set()
    while todo:
        folder = os.path.realpath(todo.pop())
        if folder in seen or not os.path.isdir(folder):
            continue
        seen.add(folder)
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_symlink():
                        target = os.path.realpath(entry.path)
                        if not inside(target, roots):
                            return entry.path
                        todo.append(target)
                    elif entry.is_dir(follow_symlinks=False):
                        todo.append(entry.path)
        except OSError:
            continue  # unreadable: the trainer cannot read it either
    return None
