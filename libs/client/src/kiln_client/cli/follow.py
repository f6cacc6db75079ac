"""``kiln follow``: a job live, like Ultralytics' own output: a line per epoch (losses, P, R, mAP) and, in a terminal,
a progress bar for the epoch under way; resumes by itself after a dropped connection."""

from __future__ import annotations

import json
from datetime import datetime

from kiln_contracts import EpochCompleted, JobFinished, JobStatusChanged, LogBatch, Progress
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TaskID, TextColumn, TimeRemainingColumn
from rich.progress import Progress as Bar

from ..client import Kiln
from ..models import JobDetail, LiveEvent
from . import exitcodes, render
from .common import err, out, print_json


class Follower:
    """Turns one job's live events into terminal lines; :meth:`handle` returns the ``finished`` payload at the end."""

    def __init__(self, console: Console, *, epochs: bool = True, logs: bool = False, as_json: bool = False) -> None:
        self.console, self.show_epochs, self.show_logs, self.as_json = console, epochs, logs, as_json
        self.cols: list[str] | None = None
        self.running_at: datetime | None = None
        self.bar: Bar | None = None
        self.task: TaskID | None = None

    def handle(self, ev: LiveEvent) -> JobFinished | None:
        data = ev.event.data
        if self.as_json:
            self.console.file.write(json.dumps(ev.model_dump(mode="json")) + "\n")
            self.console.file.flush()
            return data if isinstance(data, JobFinished) and ev.stream == "events" else None
        if isinstance(data, LogBatch) and self.show_logs:
            for line in data.lines:
                self.console.print(render.log_text(line.text))
        elif isinstance(data, JobStatusChanged):
            self.running_at = ev.event.time if data.status.value == "running" else self.running_at
            if self.show_epochs:
                self.console.print(data.status.value + (f": {data.reason}" if data.reason else ""))
        elif isinstance(data, EpochCompleted) and self.show_epochs:
            self._epoch(data)
        elif isinstance(data, Progress) and self.show_epochs:
            self._progress(data)
        elif isinstance(data, JobFinished) and ev.stream == "events":
            self.close()
            self._finished(data, ev.event.time)
            return data
        return None

    def _epoch(self, data: EpochCompleted) -> None:
        self._drop_bar()
        if self.cols is None:
            self.cols = render.columns(data.metrics)
            self.console.print(render.epoch_header(self.cols))
        self.console.print(render.epoch_line(data.epoch, data.epochs, data.metrics, self.cols, data.epoch_time))

    def _progress(self, data: Progress) -> None:
        if not self.console.is_terminal or not data.batches:
            return  # a bar only where a person watches; scripts get the epoch lines
        if self.bar is None:
            self.bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[speed]}"), TimeRemainingColumn(), console=self.console,
                           transient=True)
            self.bar.start()
        label = f"{data.epoch}/{data.epochs}".rjust(render.WIDTH)
        speed = f"{data.images_per_s:.1f} img/s" if data.images_per_s else ""
        if self.task is None:
            self.task = self.bar.add_task(label, total=data.batches, speed=speed)
        self.bar.update(self.task, description=label, total=data.batches, completed=data.batch, speed=speed)

    def _drop_bar(self) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.remove_task(self.task)
            self.task = None

    def _finished(self, data: JobFinished, at: datetime) -> None:
        if not self.show_epochs and data.status.value == "completed":
            return
        took = f" in {render.duration((at - self.running_at).total_seconds())}" if self.running_at else ""
        text = data.status.value + took + (f": {data.reason}" if data.reason else "")
        self.console.print(text + (f" (exit code {data.exit_code})" if data.exit_code not in (None, 0) else ""))
        if data.status.value in ("failed", "lost") and data.last_logs and not self.show_logs:
            for line in data.last_logs[-20:]:  # why it failed, most often
                self.console.print(f"  | {render.log_text(line)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar, self.task = None, None


def dropped(code: int | None, delay: float) -> None:
    """Say on stderr that the connection dropped (nothing is lost: it resumes after the last event shown)."""
    why = f"closed with {code}" if code is not None else "lost"
    err.print(f"kiln: connection to the notifier {why}; resuming in {delay:.1f}s")


def ended(kiln: Kiln, job: JobDetail, *, epochs: bool, logs: bool, as_json: bool) -> int:
    """A job that has already ended, from the REST API: its epochs (and logs), how it ended, its exit code."""
    if as_json:
        print_json(job)
        return exitcodes.for_status(job.status)
    if logs:
        for entry in kiln.logs(job.id, tail=10_000):
            out.print(render.log_text(entry.text))
    if epochs:
        rows = kiln.epochs(job.id)
        cols = render.columns({k: v for r in rows for k, v in r.metrics.items()})
        if rows:
            out.print(render.epoch_header(cols))
        for r in rows:
            out.print(render.epoch_line(r.epoch, job.epochs, r.metrics, cols, r.metrics.get("time/epoch")))
        out.print(render.ended(job))
    return exitcodes.for_status(job.status)


def follow(kiln: Kiln, job_id: str, *, epochs: bool = True, logs: bool = False, as_json: bool = False,
           timeout: float | None = None) -> int:
    """Follow the job until it ends; its exit code (``exitcodes``)."""
    job = kiln.get_job(job_id)
    if job.status.terminal:
        return ended(kiln, job, epochs=epochs, logs=logs, as_json=as_json)
    if epochs and not as_json:
        out.print(f"following job {job.id} ({job.spec.get('model')} on {job.spec.get('dataset')})")
    shown = Follower(out, epochs=epochs, logs=logs, as_json=as_json)
    try:
        for ev in kiln.follow(job_id, timeout=timeout, on_drop=dropped):
            finished = shown.handle(ev)
            if finished is not None:
                return exitcodes.for_status(finished.status)
    except KeyboardInterrupt:
        return exitcodes.INTERRUPTED  # the job goes on: `kiln cancel` stops it
    finally:
        shown.close()
    return exitcodes.ERROR  # not reached: the iteration ends with the finished event
