"""``kiln up`` runs every service on this machine; ``kiln demo`` runs a real training end to end.

These are the local commands of ``kiln`` (the command itself is kiln-client's): this package adds them through the
``kiln.cli`` entry point (:func:`register`), so a laptop with kiln-client alone has the remote commands only.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from .follow import follow
from .stack import Stack, StackConfig
from .supervision import GROUP, RUNNER_STOP_WAIT_S
from .synth import make_detection_dataset

# The options of both commands (the same names and defaults as before they moved to typer).
DataDir = Annotated[Path, typer.Option(help="state: NATS store, SQLite DB, logs, runs")]
Host = Annotated[str, typer.Option(help="interface for the API and notifier (default loopback only)")]
ApiPort = Annotated[int, typer.Option()]
NotifierPort = Annotated[int, typer.Option()]
NatsUrl = Annotated[str | None, typer.Option(
    help="use this NATS instead of the bundled nats-server", show_default=False)]
NatsCredsDir = Annotated[Path | None, typer.Option(
    help="with --nats-url: the services' NATS creds (a trust dir or <role>.creds files)", show_default=False)]
NatsPort = Annotated[int, typer.Option(help="port of the bundled nats-server")]
PublicUrl = Annotated[str | None, typer.Option(
    help="https://... where a TLS proxy serves the API and the notifier (deploy/proxy/nginx.conf): the page opens "
         "its sockets there and the notifier accepts that origin", show_default=False)]
DbUrl = Annotated[str | None, typer.Option(
    help="database URL (default: SQLite in the data dir); e.g. postgresql+asyncpg://user@host/db",
    show_default=False)]
Runners = Annotated[int, typer.Option()]
Slots = Annotated[int, typer.Option(help="trainers per runner")]
ClearML = Annotated[str | None, typer.Option(
    metavar="CONF|offline", show_default=False,
    help="also mirror jobs into ClearML: a clearml.conf path, or 'offline' (sessions under the data dir)")]


def _config(a: argparse.Namespace, quiet: bool = True) -> StackConfig:
    creds = getattr(a, "nats_creds_dir", None)
    if creds is not None and a.nats_url is None:
        raise typer.BadParameter("goes with --nats-url: the bundled nats-server makes its own creds",
                                 param_hint="--nats-creds-dir")
    return StackConfig(data_dir=a.data_dir, host=a.host, api_port=a.api_port, notifier_port=a.notifier_port,
                       nats_url=a.nats_url, nats_creds_dir=creds, nats_port=a.nats_port, db_url=a.db_url,
                       runners=a.runners, runner_slots=a.slots, clearml=a.clearml, quiet=quiet,
                       public_url=getattr(a, "public_url", None), metrics_port=getattr(a, "metrics_port", None))


def _ctl(stack: Stack) -> str:
    return f"{Path(sys.executable).parent / 'supervisorctl'} -c {stack.conf}"


def _without_password(url: str) -> str:
    """``url`` with its password (if any) masked, for the terminal.

    >>> _without_password("postgresql+asyncpg://kiln:s3cret@db:5432/kiln")
    'postgresql+asyncpg://kiln:***@db:5432/kiln'
    """
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in creds:
        return url
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"


def _metrics(stack: Stack) -> str:
    """Where Prometheus scrapes each service (/livez and /readyz beside /metrics)."""
    urls = stack.metrics_urls()
    lines = [f"{name}: {url}" for name, url in urls.items()]
    if stack.cfg.metrics_port is None:
        lines.append("(runners, writer: --metrics-port)")
    return "\n           ".join(lines)


def _where(stack: Stack) -> str:
    return (f"  API      {stack.api_url}/api/v1   (OpenAPI docs: {stack.api_url}/docs)\n"
            f"  Key      {stack.owner_key_file}   (the owner's API key, mode 0600: sign in to the page with it,\n"
            f"           or send it as 'Authorization: Bearer ...')\n"
            f"  Web      {stack.api_url}/\n"
            f"  CLI      kiln login {stack.api_url} < {stack.owner_key_file}   (then kiln train, jobs, follow, ...)\n"
            f"  Live     {stack.ws_url}/api/v1/ws/jobs/<job_id>\n"
            f"  NATS     {stack.nats_url}\n"
            f"  Database {_without_password(stack.db_url)}\n"
            f"  Metrics  {_metrics(stack)}\n"
            f"  Logs     {stack.data_dir / 'logs'}   (supervisord.log: restarts and stops)\n"
            f"  Control  {_ctl(stack)} status|restart {GROUP}:<service>")


def cmd_up(a: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM: the same clean stop as Ctrl-C
    try:
        stack = Stack(_config(a, quiet=False)).start()  # supervisord's lines (spawned, exited, ...) reach stdout
    except KeyboardInterrupt:
        return 130  # start() has stopped whatever it had started
    print("Kiln is up:\n" + _where(stack) + "\nCtrl-C stops it.", flush=True)
    try:
        return _watch(stack)
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the stop short (bounded)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"stopping Kiln (up to {RUNNER_STOP_WAIT_S} s while a runner drains a running job)", flush=True)
        stack.stop()


def _watch(stack: Stack) -> int:
    """supervisord restarts a service that crashes; say once which ones it gave up on, and keep the rest up."""
    reported: set[str] = set()
    while True:
        if not stack.alive():
            print(f"supervisord exited; see {stack.log('supervisord')}", file=sys.stderr, flush=True)
            return 1
        dead = set(stack.dead())
        for name in sorted(dead - reported):
            print(f"{name} kept failing at start and was given up (FATAL); the other services keep running. "
                  f"Log: {stack.log(name)}. Start it again: {_ctl(stack)} start {GROUP}:{name}",
                  file=sys.stderr, flush=True)
        reported = dead
        time.sleep(0.5)


DEMO_MODEL = Path(__file__).with_name("yolov8-demo.yaml")
"""yolov8n's layers at half its width (about 0.9 M parameters): see the file's header."""
DEMO_DATASET: dict[str, Any] = {"n_train": 256, "n_val": 64, "imgsz": 64, "seed": 0, "sizes": (0.25, 0.5),
                                "overlap": False, "min_contrast": 180}
"""Squares and circles (16 to 32 px in 64 px images, not overlapping, never near the background's colour) that
such a model learns in a minute or two on a CPU; :func:`kiln_local.synth.make_detection_dataset`."""
DEMO_TRAIN: dict[str, Any] = {"epochs": 20, "imgsz": 64, "batch": 8, "nbs": 8, "workers": 0, "warmup_epochs": 0,
                              "seed": 0, "mosaic": 0.0, "scale": 0.25, "lrf": 0.2}
"""One optimizer step per batch of 8 from the first (no warm-up), no mosaic (it would shrink 64 px shapes to a few
pixels), milder scale jitter, and a learning rate that ends at a fifth of its start rather than a hundredth; seeded, so
a machine repeats its figures exactly. What each choice gained: docs/performance.md#demo."""


Epochs = Annotated[int, typer.Option(help="training epochs (the demo's settings are tuned for the default)")]


def demo_job(root: Path, epochs: int | None = None) -> dict[str, Any]:
    """Write the demo's dataset (``root/shapes``, written afresh) and model under ``root``; returns its job spec.

    ``root`` must be one of the runners' data roots (``kiln demo``: ``<data dir>/datasets``).
    """
    shutil.rmtree(root / "shapes", ignore_errors=True)  # a dataset of other settings, and its labels cache
    data = make_detection_dataset(root / "shapes", **DEMO_DATASET)
    model = root / DEMO_MODEL.name
    shutil.copyfile(DEMO_MODEL, model)
    return {"name": "demo: YOLOv8 (half of yolov8n's width) on synthetic shapes", "model": str(model),
            "dataset": str(data), "start": True, "train": {**DEMO_TRAIN, **({"epochs": epochs} if epochs else {})}}


def _learning_curve(rows: list[dict[str, Any]]) -> str:
    """The stored epochs as a table, with mAP50 as a bar (ASCII: any terminal shows it).

    >>> print(_learning_curve([{"epoch": 7, "metrics": {"train/box_loss": 1.23, "metrics/mAP50(B)": 0.512}}]))
      epoch  box_loss  cls_loss  dfl_loss   mAP50  mAP50-95
          7     1.230         -         -   0.512         -  |##########          |
    """
    lines = ["  epoch  box_loss  cls_loss  dfl_loss   mAP50  mAP50-95"]
    for row in rows:
        m = row["metrics"]
        v = [m.get(k) for k in ("train/box_loss", "train/cls_loss", "train/dfl_loss", "metrics/mAP50(B)",
                                "metrics/mAP50-95(B)")]
        cells = [f"{x:{w}.3f}" if x is not None else f"{'-':>{w}}" for x, w in zip(v, (10, 10, 10, 8, 10))]
        bar = "#" * round(20 * (v[3] or 0))
        lines.append(f"  {row['epoch']:5d}" + "".join(cells) + f"  |{bar:<20}|")
    return "\n".join(lines)


def cmd_demo(a: argparse.Namespace) -> int:
    t0 = time.monotonic()
    spec = demo_job(a.data_dir.resolve() / "datasets", a.epochs)
    d, t = DEMO_DATASET, spec["train"]
    print(f"synthetic dataset: {spec['dataset']} ({d['n_train']} training and {d['n_val']} validation images of "
          f"{d['imgsz']} px: squares and circles)\nmodel: {spec['model']}")
    with Stack(_config(a)) as stack:
        print("Kiln is up:\n" + _where(stack), flush=True)
        api = httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {stack.owner_key()}"},
                           timeout=30)
        r = api.post("/api/v1/jobs", json=spec)
        if r.status_code != 201:
            print(f"job was refused: {r.status_code} {r.text}", file=sys.stderr)
            return 1
        job = r.json()
        print(f"job {job['id']} submitted ({job['status']}): {t['epochs']} epochs from random weights; following it "
              "live (mAP50 goes from 0, nothing found, towards 1, every shape found and named):", flush=True)
        async def ticket() -> str:
            answer = await asyncio.to_thread(api.post, "/api/v1/ws-tickets", json={"jobs": [job["id"]]})
            answer.raise_for_status()
            return str(answer.json()["ticket"])

        fin = asyncio.run(follow(stack.ws_url, job["id"], show_logs=a.logs, timeout=a.timeout, ticket=ticket))
        time.sleep(0.5)  # let the metrics-writer commit the last batch
        rows = api.get(f"/api/v1/jobs/{job['id']}/epochs").json()
        print(f"\nlearning curve, as stored in the database ({len(rows)} epochs):\n{_learning_curve(rows)}")
        maps = [row["metrics"].get("metrics/mAP50(B)") for row in rows]
        if maps and None not in (maps[0], maps[-1]):
            print(f"mAP50 went from {maps[0]:.3f} after epoch {rows[0]['epoch']} to {maps[-1]:.3f} after epoch "
                  f"{rows[-1]['epoch']}")
        print(f"\n{fin['status']} in {time.monotonic() - t0:.1f}s (wall time of this command)\n" + _where(stack))
        if a.keep:
            print("--keep: services stay up; Ctrl-C stops them.")
            try:
                while not stack.dead():
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
        return 0 if fin["status"] == "completed" else 1


def up(data_dir: DataDir = Path("var"), host: Host = "127.0.0.1", api_port: ApiPort = 8000,
       notifier_port: NotifierPort = 8001, nats_url: NatsUrl = None, nats_creds_dir: NatsCredsDir = None,
       nats_port: NatsPort = 14222, db_url: DbUrl = None, runners: Runners = 1, slots: Slots = 1,
       clearml: ClearML = None, public_url: PublicUrl = None,
       metrics_port: Annotated[int | None, typer.Option(
           help="first port of the runners', writer's and forwarder's metrics and health servers (writer: it, "
                "forwarder: +1, runner i: +10+i)", show_default=False)] = None) -> None:
    """Run every Kiln service on this machine (Ctrl-C stops them all)."""
    if public_url is not None and not public_url.startswith("https://"):
        raise typer.BadParameter("the proxy must serve HTTPS (the session cookie is Secure)",
                                 param_hint="--public-url")
    raise typer.Exit(cmd_up(argparse.Namespace(**locals())))


def demo(data_dir: DataDir = Path("var"), host: Host = "127.0.0.1", api_port: ApiPort = 8000,
         notifier_port: NotifierPort = 8001, nats_url: NatsUrl = None, nats_creds_dir: NatsCredsDir = None,
         nats_port: NatsPort = 14222, db_url: DbUrl = None, runners: Runners = 1, slots: Slots = 1,
         clearml: ClearML = None, epochs: Epochs = DEMO_TRAIN["epochs"],
         logs: Annotated[bool, typer.Option("--logs", help="also print the trainer's log lines")] = False,
         keep: Annotated[bool, typer.Option("--keep", help="keep the services running afterwards")] = False,
         timeout: Annotated[float, typer.Option()] = 900.0) -> None:
    """Start Kiln, train a small YOLO on synthetic shapes, follow it live (mAP50 rises epoch by epoch)."""
    raise typer.Exit(cmd_demo(argparse.Namespace(**locals())))


def register(app: typer.Typer) -> None:
    """The ``kiln.cli`` entry point: adds ``up`` and ``demo`` to the ``kiln`` command."""
    app.command()(up)
    app.command()(demo)


def main(argv: list[str] | None = None) -> None:
    """``kiln`` with every command (kiln-client's, which loads these through the entry point)."""
    from kiln_client.cli import main as kiln

    sys.exit(kiln(argv))


if __name__ == "__main__":
    main()
