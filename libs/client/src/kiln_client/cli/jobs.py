"""Job commands: train, jobs, show, follow, logs, cancel, rerun, artifacts, download, metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
import yaml
from kiln_contracts import JobStatus

from . import args as train_args
from . import exitcodes, render
from .common import JsonOpt, client, fail, out, print_json, table
from .follow import follow as follow_job

JobId = Annotated[str, typer.Argument(help="The job's id.", show_default=False)]
Timeout = Annotated[float | None, typer.Option(
    help=f"Give up following after this many seconds (exit code {exitcodes.TIMEOUT}).", show_default=False)]
ShowLogs = Annotated[bool, typer.Option("--logs", help="Also print the trainer's log lines.")]

TRAIN_HELP = f"""Create a training job and start it, YOLO style:

  kiln train model=yolov8n.yaml data=/data/shapes epochs=50 imgsz=640 project=vision

or from a job file (YAML or JSON; key=value arguments override it): kiln train -f job.yaml epochs=3

Keys: {", ".join(train_args.keys())}. With --follow, follows it and exits like `kiln follow`."""


def _load(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise train_args.ArgError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise train_args.ArgError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None
    return train_args.normalise(data or {}, str(path))


def _spec(pairs: list[str], file: Path | None) -> Any:
    try:
        fields = train_args.merge(_load(file) if file else {}, train_args.parse_pairs(pairs))
        return train_args.job_spec(fields)
    except train_args.ArgError as exc:
        fail(str(exc), exitcodes.USAGE)


def _after_start(kiln: Any, job: Any, follow: bool, logs: bool, as_json: bool, timeout: float | None) -> None:
    if as_json:
        print_json(job)
    else:
        out.print(f"job {job.id} {job.status.value}" + (f" ({job.name})" if job.name else "")
                  + f"; follow it with: kiln follow {job.id}" * (not follow))
    if follow:
        raise typer.Exit(follow_job(kiln, job.id, logs=logs, as_json=as_json, timeout=timeout))


def train(pairs: Annotated[list[str] | None, typer.Argument(
              metavar="KEY=VALUE...", help="Job fields and train arguments.", show_default=False)] = None,
          file: Annotated[Path | None, typer.Option(
              "--file", "-f", help="A job file (YAML or JSON).", show_default=False)] = None,
          follow: Annotated[bool, typer.Option("--follow", help="Follow the job until it ends.")] = False,
          no_start: Annotated[bool, typer.Option("--no-start", help="Create it without starting it.")] = False,
          logs: ShowLogs = False, timeout: Timeout = None, as_json: bool = JsonOpt) -> None:
    spec = _spec(pairs or [], file)
    with client() as kiln:
        job = kiln.create_job(spec, start=not no_start)
        _after_start(kiln, job, follow and not no_start, logs, as_json, timeout)


def jobs(status: Annotated[JobStatus | None, typer.Option(
             "--status", "-s", help="Only jobs in this status.", show_default=False)] = None,
         project: Annotated[str | None, typer.Option(
             "--project", "-p", help="Only this project's jobs.", show_default=False)] = None,
         limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=1000, help="At most this many.")] = 50,
         offset: Annotated[int, typer.Option(min=0, help="Skip the newest N (paging).")] = 0,
         as_json: bool = JsonOpt) -> None:
    """List jobs of your projects, newest first."""
    with client() as kiln:
        found = kiln.list_jobs(project=project, status=status, limit=limit, offset=offset)
    if as_json:
        print_json(found)
    elif found:
        out.print(table(render.JOB_HEADERS, [render.job_row(j) for j in found]))


def show(job_id: JobId, as_json: bool = JsonOpt) -> None:
    """A job's status, spec, artifacts and timeline."""
    with client() as kiln:
        job = kiln.get_job(job_id)
    if as_json:
        print_json(job)
    else:
        out.print(render.job_details(job))


def follow(job_id: JobId, logs: ShowLogs = False, timeout: Timeout = None, as_json: Annotated[bool, typer.Option(
        "--json", help="Print each event as a JSON line (an ended job: its record).")] = False) -> None:
    """Follow a job live until it ends: a line per epoch (losses, P, R, mAP), a progress bar in a terminal.

    Exits 0 when it completed, 3 failed, 4 cancelled, 5 lost (6: --timeout passed). Resumes by itself after a
    dropped connection.
    """
    with client() as kiln:
        raise typer.Exit(follow_job(kiln, job_id, logs=logs, as_json=as_json, timeout=timeout))


def logs(job_id: JobId,
         follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream new lines until the job ends.")] = False,
         tail: Annotated[int, typer.Option("--tail", "-n", min=1, max=10_000, help="The last N lines.")] = 500,
         as_json: bool = JsonOpt) -> None:
    """The trainer's log lines; with -f, live until the job ends (exit code as `kiln follow`)."""
    with client() as kiln:
        if follow:
            raise typer.Exit(follow_job(kiln, job_id, epochs=False, logs=True, as_json=as_json))
        lines = kiln.logs(job_id, tail=tail)
    if as_json:
        print_json(lines)
    for entry in [] if as_json else lines:
        out.print(render.log_text(entry.text))


def cancel(job_id: JobId, as_json: bool = JsonOpt) -> None:
    """Cancel a queued or running job (`kiln follow` then exits with 4)."""
    with client() as kiln:
        job = kiln.cancel_job(job_id)
    if as_json:
        print_json(job)
    else:
        out.print(f"cancel requested for job {job.id} ({job.status.value})")


def rerun(job_id: JobId,
          latest: Annotated[bool, typer.Option("--latest-data", help="Train on the dataset as it is now, not on the "
                                               "snapshot the original recorded.")] = False,
          follow: Annotated[bool, typer.Option("--follow", help="Follow the new job until it ends.")] = False,
          logs: ShowLogs = False, timeout: Timeout = None, as_json: bool = JsonOpt) -> None:
    """Start a new job with the same recorded spec (and dataset snapshot)."""
    data: Literal["pinned", "latest"] = "latest" if latest else "pinned"
    with client() as kiln:
        _after_start(kiln, kiln.rerun_job(job_id, data=data), follow, logs, as_json, timeout)


def artifacts(job_id: JobId, as_json: bool = JsonOpt) -> None:
    """Files the job stored (checkpoints, exports)."""
    with client() as kiln:
        found = kiln.artifacts(job_id)
    if as_json:
        print_json(found)
    elif found:
        out.print(table(["NAME", "EPOCH", "SIZE", "SHA256"], [[a.name, a.epoch, a.size, a.sha256] for a in found]))


def download(job_id: JobId,
             name: Annotated[str, typer.Argument(help="The artifact's name.")] = "best.pt",
             dest: Annotated[Path, typer.Option("--output", "-o", help="A folder (made if missing) or a file name.")]
             = Path("."),
             epoch: Annotated[int | None, typer.Option(
                 help="That epoch's version (default: the newest).", show_default=False)] = None,
             as_json: bool = JsonOpt) -> None:
    """Download an artifact, checking the SHA-256 the API recorded (a mismatch keeps nothing and exits 1)."""
    with client() as kiln:
        got = kiln.download(job_id, name, dest, epoch=epoch)
    if as_json:
        print_json({"path": str(got.path), "size": got.size, "sha256": got.sha256, "verified": got.verified})
    else:
        check = "sha256 verified" if got.verified else "no checksum recorded: not verified"
        out.print(f"{got.path}  {got.size} bytes  {check}")


def metrics(job_id: JobId,
            csv: Annotated[bool, typer.Option("--csv", help="CSV: one row per step, one column per metric.")] = False,
            keys: Annotated[str | None, typer.Option(
                help="Only these metrics (comma separated).", show_default=False)] = None,
            kind: Annotated[str | None, typer.Option(
                help="epoch (per-epoch metrics) or metrics (the SDK's log_metrics).", show_default=False)] = None,
            as_json: bool = JsonOpt) -> None:
    """A job's metric series, every point."""
    if kind not in (None, "epoch", "metrics"):
        fail("--kind is epoch or metrics", exitcodes.USAGE)
    with client() as kiln:
        m = kiln.metrics(job_id, keys=keys.split(",") if keys else None, kind=kind, max_points=0)  # type: ignore[arg-type]
    if as_json:
        print_json(m)
        return
    text = render.metrics_csv(m)
    if csv:
        out.file.write(text)
        return
    rows = [line.split(",") for line in text.splitlines()]
    out.print(table([render.label(h) if "/" in h else h for h in rows[0]], rows[1:]))


def register(app: typer.Typer) -> None:
    app.command(help=TRAIN_HELP, short_help="Create a training job: kiln train model=... data=... epochs=...")(train)
    for fn in (jobs, show, follow, logs, cancel, rerun, artifacts, download, metrics):
        app.command()(fn)
