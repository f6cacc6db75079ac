"""``kiln train``'s arguments, YOLO style (``model=yolov8n.yaml data=coco8 epochs=50``), onto a ``JobSpec``.

Every key is a ``JobSpec`` field (``name``, ``project``, ``pool``, ``task``, ``model``, ``dataset``, ``timeout_s``,
...) or a ``TrainArgs`` field (``epochs``, ``imgsz``, ``batch``, ``lr0``, ...), plus the aliases ``data`` (dataset) and
``timeout`` (timeout_s). Values are read as the field's type; ``none`` clears an optional field; a list (``retry_on``)
is comma separated. The contracts hold the one list of what is allowed: nothing here repeats it.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any, get_origin

from kiln_contracts import JobSpec, TrainArgs
from pydantic import TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

ALIASES = {"data": "dataset", "timeout": "timeout_s"}
TOP = {k: f for k, f in JobSpec.model_fields.items() if k != "train"}
TRAIN = dict(TrainArgs.model_fields)


class ArgError(ValueError):
    """An argument that cannot become part of a job spec; the message says which and why."""


def keys() -> list[str]:
    """Every key ``kiln train`` takes."""
    return sorted({*TOP, *TRAIN, *ALIASES})


def _field(key: str) -> tuple[str, str | None, FieldInfo]:
    """(field name, "train" or None, its definition) of ``key``; an unknown key is an :class:`ArgError`."""
    name = ALIASES.get(key, key)
    if name in TOP:
        return name, None, TOP[name]
    if name in TRAIN:
        return name, "train", TRAIN[name]
    near = difflib.get_close_matches(key, keys(), n=3)
    hint = f" (did you mean {' or '.join(near)}?)" if near else ""
    raise ArgError(f"unknown argument {key!r}{hint}; `kiln train --help` lists them all")


def _value(key: str, info: FieldInfo, text: str) -> Any:
    """``text`` read as the field's type (``epochs=50`` an int, ``amp=false`` a bool, ``retry_on=a,b`` a list)."""
    if text.lower() in ("none", "null") and info.default is None:
        return None
    kind: Any = info.annotation
    try:
        if get_origin(kind) is list:
            return TypeAdapter(kind).validate_python([p.strip() for p in text.split(",") if p.strip()])
        return TypeAdapter(kind).validate_strings(text)
    except ValidationError as exc:
        raise ArgError(f"{key}={text}: {exc.errors()[0]['msg']}") from None


def parse_pairs(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` words as the fields of a job spec (train arguments under ``train``).

    >>> parse_pairs(["model=yolov8n.yaml", "data=/d/shapes", "epochs=3", "amp=false", "lr0=1"])
    {'model': 'yolov8n.yaml', 'dataset': '/d/shapes', 'train': {'epochs': 3, 'amp': False, 'lr0': 1.0}}
    >>> parse_pairs(["epoch=3"])
    Traceback (most recent call last):
    ...
    kiln_client.cli.args.ArgError: unknown argument 'epoch' (did you mean epochs?); `kiln train --help` lists them all
    """
    out: dict[str, Any] = {}
    seen: set[str] = set()
    for pair in pairs:
        key, eq, text = pair.partition("=")
        key = key.strip().lstrip("-")
        if not eq or not key:
            raise ArgError(f"expected key=value, got {pair!r}")
        name, group, info = _field(key)
        if name in seen:
            raise ArgError(f"{key} is given twice")
        seen.add(name)
        (out.setdefault("train", {}) if group else out)[name] = _value(key, info, text)
    return out


def normalise(data: Mapping[str, Any], source: str = "the job file") -> dict[str, Any]:
    """A job file's fields as a job spec's: aliases resolved, train arguments at the top moved under ``train``.

    >>> normalise({"model": "m.yaml", "data": "/d", "epochs": 3, "train": {"imgsz": 64}})
    {'model': 'm.yaml', 'dataset': '/d', 'train': {'imgsz': 64, 'epochs': 3}}
    """
    if not isinstance(data, Mapping):
        raise ArgError(f"{source} must hold a mapping of job fields")
    out: dict[str, Any] = {}
    train = dict(data.get("train") or {})
    for key, value in data.items():
        if key == "train":
            continue
        name, group, _ = _field(str(key))
        if group:
            train[name] = value
        else:
            out[name] = value
    if train:
        out["train"] = train
    return out


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``, train arguments merged one by one.

    >>> merge({"model": "a.yaml", "train": {"epochs": 3, "imgsz": 64}}, {"train": {"epochs": 5}})
    {'model': 'a.yaml', 'train': {'epochs': 5, 'imgsz': 64}}
    """
    out = {**base, **{k: v for k, v in override.items() if k != "train"}}
    train = {**base.get("train", {}), **override.get("train", {})}
    if train:
        out["train"] = train
    return out


def job_spec(fields: Mapping[str, Any]) -> JobSpec:
    """The spec, checked; a bad or missing field is an :class:`ArgError` naming it as ``kiln train`` spells it.

    >>> job_spec({"model": "yolov8n.yaml"})
    Traceback (most recent call last):
    ...
    kiln_client.cli.args.ArgError: data (the dataset): Field required
    """
    try:
        return JobSpec.model_validate(dict(fields))
    except ValidationError as exc:
        lines = []
        for e in exc.errors():
            loc = [str(p) for p in e["loc"] if p != "train"]
            where = ".".join(loc) or "spec"
            where = "data (the dataset)" if where == "dataset" else where
            lines.append(f"{where}: {e['msg']}")
        raise ArgError("; ".join(lines)) from None
