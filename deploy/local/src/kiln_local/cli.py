"""The ``kiln`` command: ``up`` runs every service on this machine; ``demo`` runs a real training end to end."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path

import httpx

from .follow import follow
from .stack import Stack, StackConfig
from .supervision import GROUP, RUNNER_STOP_WAIT_S
from .synth import make_detection_dataset


def _stack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=Path("var"), help="state: NATS store, SQLite DB, logs, runs")
    p.add_argument("--host", default="127.0.0.1", help="interface for the API and notifier (default loopback only)")
    p.add_argument("--api-port", type=int, default=8000)
    p.add_argument("--notifier-port", type=int, default=8001)
    p.add_argument("--nats-url", default=None, help="use this NATS instead of the bundled nats-server")
    p.add_argument("--nats-port", type=int, default=14222, help="port of the bundled nats-server")
    p.add_argument("--db-url", default=None, help="database URL (default: SQLite in the data dir); "
                   "e.g. postgresql+asyncpg://user@host/db")
    p.add_argument("--runners", type=int, default=1)
    p.add_argument("--slots", type=int, default=1, help="trainers per runner")
    p.add_argument("--clearml", default=None, metavar="CONF|offline",
                   help="also mirror jobs into ClearML: a clearml.conf path, or 'offline' (sessions under the data dir)")


def _config(a: argparse.Namespace, quiet: bool = True) -> StackConfig:
    return StackConfig(data_dir=a.data_dir, host=a.host, api_port=a.api_port, notifier_port=a.notifier_port,
                       nats_url=a.nats_url, nats_port=a.nats_port, db_url=a.db_url, runners=a.runners,
                       runner_slots=a.slots, clearml=a.clearml, quiet=quiet)


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


def _where(stack: Stack) -> str:
    return (f"  API      {stack.api_url}/api/v1   (OpenAPI docs: {stack.api_url}/docs)\n"
            f"  Key      {stack.owner_key_file}   (the owner's API key, mode 0600: sign in to the page with it,\n"
            f"           or send it as 'Authorization: Bearer ...')\n"
            f"  Web      {stack.api_url}/\n"
            f"  Live     {stack.ws_url}/api/v1/ws/jobs/<job_id>\n"
            f"  NATS     {stack.nats_url}\n"
            f"  Database {_without_password(stack.db_url)}\n"
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


def cmd_demo(a: argparse.Namespace) -> int:
    t0 = time.monotonic()
    data = make_detection_dataset(a.data_dir.resolve() / "datasets" / "shapes", n_train=32, n_val=16, imgsz=64)
    print(f"synthetic dataset: {data}")
    with Stack(_config(a)) as stack:
        print("Kiln is up:\n" + _where(stack), flush=True)
        spec = {"name": "demo: yolov8n on synthetic shapes", "model": "yolov8n.yaml", "dataset": str(data),
                "start": True, "train": {"epochs": a.epochs, "imgsz": 64, "batch": 8, "nbs": 8, "workers": 0,
                                         "warmup_epochs": 0, "seed": 0}}
        api = httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {stack.owner_key()}"},
                           timeout=30)
        r = api.post("/api/v1/jobs", json=spec)
        if r.status_code != 201:
            print(f"job was refused: {r.status_code} {r.text}", file=sys.stderr)
            return 1
        job = r.json()
        print(f"job {job['id']} submitted ({job['status']}); following it live:", flush=True)
        async def ticket() -> str:
            answer = await asyncio.to_thread(api.post, "/api/v1/ws-tickets", json={"jobs": [job["id"]]})
            answer.raise_for_status()
            return str(answer.json()["ticket"])

        fin = asyncio.run(follow(stack.ws_url, job["id"], show_logs=a.logs, timeout=a.timeout, ticket=ticket))
        time.sleep(0.5)  # let the metrics-writer commit the last batch
        rows = api.get(f"/api/v1/jobs/{job['id']}/epochs").json()
        print(f"\nmetrics stored in the database: {len(rows)} epochs")
        for row in rows:
            m = row["metrics"]
            print(f"  epoch {row['epoch']}: " + ", ".join(f"{k}={m[k]:.4f}" for k in sorted(m) if m[k] is not None))
        print(f"\n{fin['status']} in {time.monotonic() - t0:.1f}s (wall time of this command)\n" + _where(stack))
        if a.keep:
            print("--keep: services stay up; Ctrl-C stops them.")
            try:
                while not stack.dead():
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
        return 0 if fin["status"] == "completed" else 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kiln", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="run every Kiln service on this machine")
    _stack_args(up)
    up.set_defaults(fn=cmd_up)
    demo = sub.add_parser("demo", help="start Kiln, train YOLO on a synthetic dataset, follow it live")
    _stack_args(demo)
    demo.add_argument("--epochs", type=int, default=3)
    demo.add_argument("--logs", action="store_true", help="also print the trainer's log lines")
    demo.add_argument("--keep", action="store_true", help="keep the services running afterwards")
    demo.add_argument("--timeout", type=float, default=900.0)
    demo.set_defaults(fn=cmd_demo)
    a = parser.parse_args(argv)
    sys.exit(a.fn(a))


if __name__ == "__main__":
    main()
