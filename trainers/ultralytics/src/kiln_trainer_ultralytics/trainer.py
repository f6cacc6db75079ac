"""Run one Kiln job attempt with Ultralytics: spec in, events out, exit code as the runner expects.

Exit codes: 0 completed, 3 cancelled on request, 2 user error (one ``kiln: ...`` line on stderr), else failure.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import kiln_sdk
from kiln_contracts import StartJob, Task
from kiln_sdk import JobContext, Run

from . import dataset as datasets
from kiln_contracts import data_roots as paths

from . import environment

EXIT_OK, EXIT_USER_ERROR, EXIT_CANCELLED = 0, 2, 3

COMMON_DEFAULTS: dict[str, Any] = {"verbose": True, "save": True}
TASK_DEFAULTS: dict[Task, dict[str, Any]] = {
    Task.detect: {},
    Task.segment: {"overlap_mask": True},
    Task.pose: {},
    Task.obb: {},
    Task.classify: {},
}
"""Ultralytics arguments outside ``TrainArgs`` that Kiln fixes per task; the job's own arguments win."""

RESUME_OVERRIDES = ("imgsz", "batch", "workers", "cache", "patience", "val", "plots", "save_period")
"""On resume Ultralytics takes every other argument from the checkpoint."""


class UserError(Exception):
    """A problem with what the user asked for (model, dataset, config): exit code 2, no traceback."""


def load_spec(ctx: JobContext) -> StartJob:
    try:
        spec = ctx.load_spec()
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"job spec {ctx.spec_path} is unreadable: {str(exc).splitlines()[0]}") from exc
    if spec is None:
        raise UserError("KILN_JOB_SPEC is not set")
    return spec


def resolve_dataset(ctx: JobContext, spec: StartJob) -> str:
    """The local dataset path: ``KILN_DATASET`` (the runner resolved it), else the spec's local path."""
    raw = ctx.dataset or spec.spec.dataset
    if raw.startswith("s3://"):
        raise UserError(f"dataset {raw} was not fetched by the runner (KILN_DATASET is not set)")
    path = Path(raw)
    if not path.exists():
        raise UserError(f"dataset not found: {raw}")
    if spec.spec.task != Task.classify and path.is_dir():
        yaml = next((p for p in (path / "data.yaml", path / "data.yml") if p.exists()), None)
        if yaml is None:
            raise UserError(f"dataset {raw} is a folder without data.yaml")
        path = yaml
    return str(path.resolve())


def checked_dataset(ctx: JobContext, path: str) -> str:
    """A data YAML goes to Ultralytics as a checked copy in the job folder (see :mod:`.dataset`)."""
    source = Path(path)
    if source.suffix not in (".yaml", ".yml"):
        return path
    try:
        return str(datasets.checked_copy(source, ctx.job_dir.resolve() / "dataset", say=_say))
    except datasets.DatasetRejected as exc:
        raise UserError(f"dataset {path}: {exc}") from exc


def _say(line: str) -> None:
    print(line, flush=True)


def data_roots() -> tuple[str, ...] | None:
    """The data roots the runner enforces (``KILN_DATA_ROOTS``, a JSON list); ``None`` outside a runner."""
    raw = os.environ.get(paths.ROOTS_ENV)
    if raw is None:
        return None
    try:
        return paths.real_roots(paths.parse_roots(raw))
    except ValueError as exc:  # bad JSON included
        raise UserError(f"{paths.ROOTS_ENV} is unreadable: {exc}") from exc


def check_dataset(path: str, roots: tuple[str, ...] | None) -> None:
    """Under a runner: nothing the dataset names lies outside its data roots (:mod:`kiln_contracts.data_roots`)."""
    if roots is not None:
        try:
            paths.check_dataset(path, roots)
        except paths.PathRefused as exc:
            raise UserError(str(exc)) from exc


def model_to_load(spec: StartJob, resume: str | None, roots: tuple[str, ...] | None) -> str:
    """The model (or resume checkpoint) to hand Ultralytics, refused before anything opens it.

    Under a runner it must lie under the data roots (``KILN_MODEL``: the file the runner checked; the resume
    checkpoint: the runner fetched it, its folder is among the roots it passes).
    """
    name = resume or os.environ.get("KILN_MODEL") or spec.spec.model
    if roots is None:
        if name.endswith(".pt") and not Path(name).is_file():
            raise UserError(f"model not found: {name}")
        return name
    try:
        return paths.model_file(name, roots, os.getcwd()) or name
    except paths.PathRefused as exc:
        raise UserError(str(exc)) from exc


def resolve_device(requested: str | None) -> str | None:
    """``cpu`` when CUDA is unusable (or hidden); otherwise what the job asked (``None``: Ultralytics picks)."""
    import torch

    if requested == "cpu" or not torch.cuda.is_available():
        if requested not in (None, "cpu"):
            print(f"kiln: device {requested} requested but CUDA is unavailable: training on cpu", flush=True)
        return "cpu"
    if requested is None and os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return "cpu"
    return requested


def train_args(ctx: JobContext, spec: StartJob, dataset: str, device: str | None, resume: str | None) -> dict:
    job = spec.spec
    args: dict[str, Any] = {**COMMON_DEFAULTS, **TASK_DEFAULTS.get(job.task, {}), **job.train.model_dump(mode="json")}
    args.update(data=dataset, project=str(ctx.job_dir.resolve()), name="train", exist_ok=True, device=device)
    if resume:
        keep = {k: args[k] for k in RESUME_OVERRIDES}
        args = {**keep, "data": dataset, "device": device, "resume": resume,
                "save_dir": str(ctx.job_dir.resolve() / "train")}
    if args.get("device") is None:
        args.pop("device", None)
    return args


def _user_error_from(exc: BaseException, dataset: str) -> UserError | None:
    text = " ".join(str(exc).split())[:400]
    if "dataset" in text.lower():
        return UserError(f"dataset {dataset}: {text}")
    if isinstance(exc, FileNotFoundError):
        return UserError(f"file not found: {text}")
    return None


def build_model(spec: StartJob, name: str) -> Any:
    from ultralytics import YOLO

    try:
        model = YOLO(name)
    except FileNotFoundError as exc:
        raise UserError(f"model not found: {name} ({' '.join(str(exc).split())[:200]})") from exc
    if model.task != spec.spec.task.value:
        raise UserError(f"model {name} is a {model.task} model but the job's task is {spec.spec.task.value}")
    return model


def train(run: Run, ctx: JobContext, spec: StartJob) -> int:
    """Train; returns the exit code (raises :class:`UserError` for user errors, anything else is a failure)."""
    roots = data_roots()
    source = resolve_dataset(ctx, spec)
    check_dataset(source, roots)
    dataset = checked_dataset(ctx, source)
    resume = ctx.resume or spec.resume_from
    model_name = model_to_load(spec, resume, roots)
    environment.prepare(ctx.job_dir.resolve())
    from kiln_sdk.integrations.ultralytics import add_kiln_callbacks

    environment.switch_off_integrations()
    datasets.forbid_downloads()
    print("kiln: versions " + " ".join(f"{k}={v}" for k, v in environment.versions().items()), flush=True)
    model = add_kiln_callbacks(build_model(spec, model_name))
    args = train_args(ctx, spec, dataset, resolve_device(spec.spec.train.device), resume)
    try:
        model.train(**args)
    except (FileNotFoundError, RuntimeError) as exc:
        err = _user_error_from(exc, dataset)
        if err is None:
            raise
        raise err from exc
    return EXIT_CANCELLED if run.cancelled else EXIT_OK


def main() -> int:
    """Entry point of ``python -m kiln_trainer_ultralytics`` (see the module docstring for exit codes)."""
    ctx = JobContext.from_env()
    try:
        spec = load_spec(ctx)
    except UserError as exc:
        print(f"kiln: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    with kiln_sdk.init() as run:
        try:
            code = train(run, ctx, spec)
        except UserError as exc:
            print(f"kiln: {exc}", file=sys.stderr, flush=True)
            run.finish("failed")
            return EXIT_USER_ERROR
    return code
