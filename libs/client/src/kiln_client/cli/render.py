"""Text for the terminal, without I/O: epoch lines like Ultralytics' own, a job's details, metrics as CSV."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from kiln_contracts import TrainArgs

from ..models import Job, JobDetail, Metrics

WIDTH = 11  # Ultralytics prints its columns 11 wide
_DEFAULTS = TrainArgs().model_dump(mode="json")  # `kiln show` lists the train arguments that differ from these
_SHOWN = ("epochs", "imgsz", "batch")  # ... and these, always


def label(key: str) -> str:
    """A metric's column title, as Ultralytics spells it.

    >>> [label(k) for k in ("train/box_loss", "metrics/precision(B)", "metrics/mAP50-95(B)", "metrics/recall(M)")]
    ['box_loss', 'P', 'mAP50-95', 'R(M)']
    >>> label("metrics/accuracy_top1")
    'top1_acc'
    """
    name = key.split("/", 1)[-1].replace("(B)", "")
    name = name.replace("precision", "P").replace("recall", "R")
    if name.startswith("accuracy_top"):
        name = f"top{name.removeprefix('accuracy_top')}_acc"
    return name


_ORDER = ("precision", "recall", "mAP50(", "mAP50-95", "accuracy")  # Ultralytics' order of validation metrics


def _rank(key: str) -> int:
    return next((i for i, word in enumerate(_ORDER) if word in key), len(_ORDER))


def columns(metrics: Mapping[str, Any]) -> list[str]:
    """The metrics an epoch line shows: train losses, then validation metrics (P, R, mAP50, mAP50-95, ...).

    >>> columns({"lr/pg0": 0.01, "metrics/mAP50(B)": 0.2, "train/box_loss": 1.5, "metrics/precision(B)": 0.1})
    ['train/box_loss', 'metrics/precision(B)', 'metrics/mAP50(B)']
    """
    return ([k for k in metrics if k.startswith("train/")]
            + sorted((k for k in metrics if k.startswith("metrics/")), key=_rank))


def epoch_header(cols: Sequence[str]) -> str:
    """The title line of the epoch lines.

    >>> epoch_header(["train/box_loss", "metrics/mAP50(B)"])
    '      Epoch   box_loss      mAP50       time'
    """
    return f"{'Epoch':>{WIDTH}}" + "".join(f"{label(c):>{WIDTH}}" for c in cols) + f"{'time':>{WIDTH}}"


def epoch_line(epoch: int, epochs: int | None, metrics: Mapping[str, float | None], cols: Sequence[str],
               seconds: float | None = None) -> str:
    """One epoch, under :func:`epoch_header`.

    >>> epoch_line(3, 50, {"train/box_loss": 1.23456, "metrics/mAP50(B)": 0.0412}, ["train/box_loss",
    ...            "metrics/mAP50(B)"], 41.23)
    '       3/50      1.235     0.0412      41.2s'
    """
    cells = [f"{epoch}/{epochs}" if epochs else str(epoch)]
    for c in cols:
        v = metrics.get(c)
        cells.append("-" if v is None else f"{v:.4g}")
    cells.append(f"{seconds:.1f}s" if seconds else "")
    return "".join(f"{c:>{WIDTH}}" for c in cells)


_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


def log_text(text: str) -> str:
    """A trainer's log line without its terminal control sequences (Ultralytics redraws its bars with them).

    >>> log_text("\\x1b[K      9/300   5.0: 50% 1/2\\r")
    '      9/300   5.0: 50% 1/2'
    """
    return _ESCAPES.sub("", text)


def duration(seconds: float) -> str:
    """Seconds in words.

    >>> duration(4.25), duration(83), duration(7322)
    ('4.2s', '1m 23s', '2h 2m')
    """
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    if m < 60:
        return f"{m}m {s}s"
    h, m = divmod(m, 60)
    return f"{h}h {m}m"


def when(t: datetime | None) -> str:
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S") if t else ""


def progress(job: Job) -> str:
    """Epochs done of those planned.

    >>> progress(Job(id="j", project="p", status="running", created_at="2025-01-01T00:00:00Z", epoch=3, epochs=50))
    '3/50'
    """
    if job.epochs:
        return f"{job.epoch or 0}/{job.epochs}"
    planned = job.spec.get("train", {}).get("epochs")
    return f"0/{planned}" if planned else ""


def job_row(job: Job) -> list[str]:
    return [job.id, job.status.value, progress(job), job.project, job.name, str(job.spec.get("model", "")),
            when(job.created_at)]


JOB_HEADERS = ["ID", "STATUS", "EPOCH", "PROJECT", "NAME", "MODEL", "CREATED"]


def ended(job: Job) -> str:
    """How the job ended (or stands), in one line.

    >>> ended(Job(id="j", project="p", status="failed", created_at="2025-01-01T00:00:00Z", reason="OOM",
    ...           exit_code=1))
    'failed: OOM (exit code 1)'
    """
    text = str(job.status.value) + (f": {job.reason}" if job.reason else "")
    return text + (f" (exit code {job.exit_code})" if job.exit_code is not None else "")


def job_details(job: JobDetail) -> str:
    """``kiln show``: the job, its spec, its artifacts and its timeline."""
    spec, train = job.spec, job.spec.get("train", {})
    rows = [("job", f"{job.id}" + (f"  ({job.name})" if job.name else "")),
            ("status", ended(job) + (f"  attempt {job.attempt}" if job.attempt > 1 else "")),
            ("project", f"{job.project}   pool {job.pool}"),
            ("model", str(spec.get("model", ""))), ("dataset", str(spec.get("dataset", ""))),
            ("epoch", progress(job))]
    if job.runner:
        rows.append(("runner", job.runner + (f" on {job.host}" if job.host else "")))
    rows.append(("created", when(job.created_at)))
    if job.started_at:
        rows.append(("started", when(job.started_at)))
    if job.finished_at:
        took = f" (took {duration((job.finished_at - job.started_at).total_seconds())})" if job.started_at else ""
        rows.append(("finished", when(job.finished_at) + took))
    if job.rerun_of:
        rows.append(("rerun of", job.rerun_of))
    rows.append(("train", " ".join(f"{k}={v}" for k, v in train.items() if _DEFAULTS.get(k, v) != v or k in _SHOWN)))
    for art in job.artifacts:
        rows.append(("artifact", f"{art.name}  {art.size} bytes" + (f"  epoch {art.epoch}" if art.epoch else "")
                     + f"  sha256 {art.sha256}"))
    if job.timeline:
        rows.append(("timeline", ", ".join(f"{t.get('status')} {str(t.get('time', ''))[11:19]}"
                                           for t in job.timeline)))
    return "\n".join(f"{k:<9} {v}" for k, v in rows)


def metrics_csv(m: Metrics) -> str:
    """Every series as CSV: one row per step, one column per metric (empty where a step lacks it).

    >>> from kiln_client.models import Series
    >>> print(metrics_csv(Metrics(job_id="j", series={"b": Series(steps=[1, 2], values=[0.5, None]),
    ...                                              "a": Series(steps=[2], values=[3.0])})), end="")
    step,a,b
    1,,0.5
    2,3.0,
    """
    keys = sorted(m.series)
    rows: dict[int, dict[str, float | None]] = {}
    for k in keys:
        for step, value in zip(m.series[k].steps, m.series[k].values):
            rows.setdefault(step, {})[k] = value
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["step", *keys])
    for step in sorted(rows):
        writer.writerow([step, *("" if rows[step].get(k) is None else rows[step][k] for k in keys)])
    return buf.getvalue()
