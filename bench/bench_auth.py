"""Benchmark: what authentication adds to a REST call and to a WebSocket handshake (a script, not a test).

Starts a nats-server, two API processes on one database (one with authentication on, one with ``auth=off``) and two
notifiers (tickets required / ``auth=off``), then alternates the same request against both sides so that the machine's
noise lands on both alike:

- REST: ``GET /api/v1/jobs/<id>`` with an API key (bearer), with the page's session cookie, and without credentials on
  the open API. Authentication costs one indexed key lookup and one membership query per request (nothing is cached,
  so a revocation takes effect on the next request).
- Ticket: ``POST /api/v1/ws-tickets`` (the extra call a client makes before each WebSocket).
- WebSocket: connect to ``/api/v1/ws/jobs/<id>`` until the ``subscribed`` message, with a ticket in the subprotocol
  header (signature checked by the notifier) against no ticket on the open notifier.

    .venv/bin/python bench/bench_auth.py                 # 2,000 REST rounds, 300 WebSocket rounds, SQLite
    .venv/bin/python bench/bench_auth.py --db-url postgresql+asyncpg://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import websockets

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from kiln_testing import NatsServer, free_port  # noqa: E402

from kiln_api.auth.keys import new_api_key  # noqa: E402
from kiln_contracts import tickets  # noqa: E402


def serve(module: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    return subprocess.Popen([sys.executable, "-m", module], env=os.environ | env, stdout=out, stderr=out)


def wait(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def line(name: str, samples: list[float], base: list[float] | None = None) -> str:
    p50, p99 = pct(samples, 0.5) * 1e3, pct(samples, 0.99) * 1e3
    text = f"  {name:<34} p50 {p50:7.3f} ms   p99 {p99:7.3f} ms"
    if base:
        b50, b99 = pct(base, 0.5) * 1e3, pct(base, 0.99) * 1e3
        text += f"   added p50 {p50 - b50:+.3f} ms (x{p50 / b50:.2f}), p99 {p99 - b99:+.3f} ms"
    return text


def rest(args: argparse.Namespace, on: str, off: str, key: str, job: str) -> None:
    with httpx.Client(base_url=on, headers={"Authorization": f"Bearer {key}"}) as keyed, \
            httpx.Client(base_url=on) as cookie, httpx.Client(base_url=off) as open_:
        signed = cookie.post("/api/v1/session", json={"api_key": key})
        signed.raise_for_status()
        # httpx keeps Secure cookies for https only; a browser sends this one to http://127.0.0.1 too
        cookie.cookies.clear()
        cookie.headers["Cookie"] = f"kiln_session={signed.cookies['kiln_session']}"
        samples: dict[str, list[float]] = {"open": [], "key": [], "cookie": [], "ticket": []}
        calls = {"open": lambda: open_.get(f"/api/v1/jobs/{job}"), "key": lambda: keyed.get(f"/api/v1/jobs/{job}"),
                 "cookie": lambda: cookie.get(f"/api/v1/jobs/{job}"),
                 "ticket": lambda: keyed.post("/api/v1/ws-tickets", json={"jobs": [job]})}
        for _ in range(50):  # warm up both processes
            for call in calls.values():
                call().raise_for_status()
        for i in range(args.rounds):
            order = list(calls) if i % 2 == 0 else list(reversed(calls))
            for name in order:
                t0 = time.perf_counter()
                calls[name]().raise_for_status()
                samples[name].append(time.perf_counter() - t0)
    print(f"REST GET /api/v1/jobs/<id>, {args.rounds} rounds, each side alternated:")
    print(line("no authentication (auth=off)", samples["open"]))
    print(line("API key (Authorization: Bearer)", samples["key"], samples["open"]))
    print(line("page session (cookie)", samples["cookie"], samples["open"]))
    print(line("POST /api/v1/ws-tickets (key)", samples["ticket"]))


async def ws(args: argparse.Namespace, on: str, off: str, api: str, key: str, job: str) -> None:
    async with httpx.AsyncClient(base_url=api, headers={"Authorization": f"Bearer {key}"}) as client:
        async def ticket() -> str:
            r = await client.post("/api/v1/ws-tickets", json={"jobs": [job]})
            r.raise_for_status()
            return str(r.json()["ticket"])

        async def handshake(url: str, protocols: list[str] | None) -> float:
            t0 = time.perf_counter()
            async with websockets.connect(f"{url}/api/v1/ws/jobs/{job}", subprotocols=protocols) as sock:
                async for raw in sock:
                    if json.loads(raw)["type"] == "subscribed":
                        return time.perf_counter() - t0
            raise RuntimeError("closed before subscribed")

        samples: dict[str, list[float]] = {"open": [], "ticket": []}
        for i in range(args.ws_rounds + 10):
            t = await ticket()  # fetched outside the timed part: its cost is the REST line above
            pair = [("open", off, None), ("ticket", on, ["kiln.v1", f"kiln.ticket.{t}"])]
            for name, url, protocols in (pair if i % 2 == 0 else pair[::-1]):
                took = await handshake(url, protocols)
                if i >= 10:
                    samples[name].append(took)
    print(f"WebSocket connect until 'subscribed' (history replay of a job with no events), {args.ws_rounds} rounds:")
    print(line("no ticket (auth=off)", samples["open"]))
    print(line("ticket in the subprotocol header", samples["ticket"], samples["open"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--ws-rounds", type=int, default=300)
    ap.add_argument("--db-url", default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-auth-"))
    nats = NatsServer(tmp / "nats")
    nats.start()
    private, public = tickets.generate_keypair()
    (tmp / "t.pem").write_bytes(private)
    (tmp / "t.pub").write_bytes(public)
    key = new_api_key().secret
    db = args.db_url or f"sqlite+aiosqlite:///{tmp / 'kiln.db'}"
    ports = {n: free_port() for n in ("api_on", "api_off", "ws_on", "ws_off")}
    common = {"KILN_API_NATS_URL": nats.url, "KILN_API_DATABASE_URL": db, "KILN_API_SWEEP_INTERVAL_S": "3600"}
    procs = []
    try:
        procs.append(serve("kiln_api", common | {"KILN_API_PORT": str(ports["api_on"]), "KILN_API_BOOTSTRAP_KEY": key,
                                                  "KILN_API_TICKET_PRIVATE_KEY_FILE": str(tmp / "t.pem")},
                           tmp / "api-on.log"))
        wait(f"http://127.0.0.1:{ports['api_on']}/healthz")  # migrated; the open API starts on a ready schema
        procs.append(serve("kiln_api", common | {"KILN_API_PORT": str(ports["api_off"]), "KILN_API_AUTH": "off"},
                           tmp / "api-off.log"))
        notifier = {"KILN_NOTIFIER_NATS_URL": nats.url, "KILN_NOTIFIER_LOG_LEVEL": "WARNING"}
        procs.append(serve("kiln_notifier", notifier | {"KILN_NOTIFIER_PORT": str(ports["ws_on"]),
                                                        "KILN_NOTIFIER_TICKET_PUBLIC_KEY_FILE": str(tmp / "t.pub")},
                           tmp / "ws-on.log"))
        procs.append(serve("kiln_notifier", notifier | {"KILN_NOTIFIER_PORT": str(ports["ws_off"]),
                                                        "KILN_NOTIFIER_AUTH": "off"}, tmp / "ws-off.log"))
        for name, port in ports.items():
            wait(f"http://127.0.0.1:{port}/healthz")
        on, off = f"http://127.0.0.1:{ports['api_on']}", f"http://127.0.0.1:{ports['api_off']}"
        job = httpx.post(f"{on}/api/v1/jobs", headers={"Authorization": f"Bearer {key}"},
                         json={"model": "yolov8n.yaml", "dataset": "/data/x"}).json()["id"]
        print(f"database: {db.split(':', 1)[0]}; Python {sys.version.split()[0]}; {os.cpu_count()} CPUs")
        rest(args, on, off, key, job)
        asyncio.run(ws(args, f"ws://127.0.0.1:{ports['ws_on']}", f"ws://127.0.0.1:{ports['ws_off']}", on, key, job))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
        nats.stop()


if __name__ == "__main__":
    main()
