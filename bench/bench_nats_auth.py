"""Benchmark: what JWT auth and TLS cost a NATS client: connection setup and JetStream publish throughput.

Starts four local nats-servers with JetStream (file storage): no auth, JWT auth (the generated operator config with
its full resolver), mutual TLS without auth, and JWT auth with mutual TLS. The client side is a trainer: creds minted
with the trainer scoped key (from a file, as the runner hands them over) and its own inbox prefix. The servers are
measured in turns, round after round, so that the machine's noise lands on all of them alike.

- connect: ``nats.connect`` until the server's PONG (TLS handshake and the JWT nonce signature included).
- js.publish: one message at a time, waiting for each ack (the runner's and the API's way).
- SDK publisher: the trainer SDK's ``AckPublisher``, batches of 100 in flight (the trainer's way).

    .venv/bin/python bench/bench_nats_auth.py                  # 3 rounds, 100 connects, 2,000 msgs of 256 B
    .venv/bin/python bench/bench_nats_auth.py --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import nats  # noqa: E402

from kiln_contracts import subjects  # noqa: E402
from kiln_contracts.natsauth.mint import mint_trainer  # noqa: E402
from kiln_contracts.natsauth.provision import provision  # noqa: E402
from kiln_contracts.natsauth.trust import write_secret  # noqa: E402
from kiln_sdk._acks import AckPublisher  # noqa: E402
from kiln_testing import free_port  # noqa: E402
from kiln_testing.natsauth import AuthNats, PrivateCA, make_auth_nats, make_ca  # noqa: E402

SUBJECT = subjects.event("bench", "j1", "metrics")


async def _quiet(exc: Exception) -> None:
    pass  # nats-py reports an SSL close_notify race at close as an error: not the benchmark's business


class Setup:
    """One server and how a trainer connects to it."""

    def __init__(self, name: str, server: AuthNats, options: Callable[[], dict[str, Any]]) -> None:
        self.name, self.server, self._options = name, server, options

    def options(self) -> dict[str, Any]:
        return {**self._options(), "error_cb": _quiet}


def plain_server(root: Path, tls: PrivateCA | None) -> AuthNats:
    """A server without auth (optionally with the same TLS block), driven like the JWT one."""
    port = free_port()
    conf = root / "nats-server.conf"
    lines = [f'listen: "127.0.0.1:{port}"', f'jetstream: {{ store_dir: "{root / "js"}" }}']
    if tls is not None:
        t = tls.server_tls()
        lines.append(f'tls {{ cert_file: "{t.cert_file}", key_file: "{t.key_file}", ca_file: "{t.ca_file}", '
                     "verify: true }")
    root.mkdir(parents=True, exist_ok=True)
    conf.write_text("\n".join(lines) + "\n")
    return AuthNats(chain=None, conf=conf, port=port, pools=(), scheme="tls" if tls else "nats")  # type: ignore[arg-type]


def setups(root: Path) -> tuple[list[Setup], ssl.SSLContext]:
    ca = make_ca(root / "ca")
    ctx = ca.client_context()  # one SSLContext reused, as a long-lived client would

    def tls_opts() -> dict[str, Any]:
        return {"tls": ctx}

    out: list[Setup] = []
    for name, auth, tls in (("none", False, False), ("jwt", True, False), ("tls", False, True),
                            ("jwt+tls", True, True)):
        if not auth:
            out.append(Setup(name, plain_server(root / name, ca if tls else None), tls_opts if tls else dict))
            continue
        server = make_auth_nats(root / name, ("bench",), tls=ca.server_tls() if tls else None)
        seed = server.chain.seed_path("trainer").read_text()
        minted = mint_trainer(seed, server.chain.account, "bench", "j1", int(time.time()) + 3600)
        creds = write_secret(root / name / "trainer.creds", minted.creds)

        def jwt_opts(creds: Path = creds, inbox: str = minted.inbox_prefix, tls: bool = tls) -> dict[str, Any]:
            return {"user_credentials": str(creds), "inbox_prefix": inbox, **({"tls": ctx} if tls else {})}

        out.append(Setup(name, server, jwt_opts))
    return out, ctx


async def prepare(s: Setup, ctx: ssl.SSLContext) -> None:
    if s.server.chain is None:
        nc = await nats.connect(s.server.url, **s.options())
    else:
        tls = {"tls": ctx} if s.server.scheme == "tls" else {}
        nc = await nats.connect(s.server.url, **s.server.connect_options("provisioner"), **tls)
    await provision(nc.jetstream(), ("bench",))
    await nc.close()


async def connect_ms(s: Setup, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        nc = await nats.connect(s.server.url, **s.options())
        times.append((time.perf_counter() - t0) * 1000)
        await nc.close()
    return times


async def publish_rate(s: Setup, n: int, payload: bytes, sdk: bool) -> float:
    nc = await nats.connect(s.server.url, **s.options())
    js = nc.jetstream()
    await js.publish(SUBJECT, payload)  # warm-up
    t0 = time.perf_counter()
    if sdk:
        pub = await AckPublisher.open(nc)
        for start in range(0, n, 100):
            batch = await pub.start([(SUBJECT, payload, f"m{time.time_ns()}-{i}") for i in range(start, start + 100)])
            errors = await batch.settle(timeout=10.0)
            assert not any(errors), errors[:3]
    else:
        for _ in range(n):
            await js.publish(SUBJECT, payload)
    rate = n / (time.perf_counter() - t0)
    await nc.close()
    return rate


async def run(args: argparse.Namespace) -> dict[str, Any]:
    payload = b"x" * args.payload
    with tempfile.TemporaryDirectory(prefix="kiln-bench-natsauth-") as tmp:
        all_setups, ctx = setups(Path(tmp))
        for s in all_setups:
            s.server.start()
        try:
            for s in all_setups:
                await prepare(s, ctx)
            res: dict[str, dict[str, list[float]]] = {s.name: {"connect_ms": [], "publish": [], "sdk": []}
                                                       for s in all_setups}
            for _ in range(args.rounds):
                for s in all_setups:
                    r = res[s.name]
                    r["connect_ms"] += await connect_ms(s, args.connects)
                    r["publish"].append(await publish_rate(s, args.messages, payload, sdk=False))
                    r["sdk"].append(await publish_rate(s, args.messages * 5, payload, sdk=True))
        finally:
            for s in all_setups:
                s.server.stop()
    return summarize(res, args)


def summarize(res: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"setup": f"{args.rounds} rounds; {args.connects} connects, {args.messages} js.publish and "
                                    f"{args.messages * 5} SDK messages of {args.payload} B per round; loopback, R1"}
    base = {k: statistics.median(v) for k, v in res["none"].items()}
    for name, r in res.items():
        med = {k: statistics.median(v) for k, v in r.items()}
        p90 = sorted(r["connect_ms"])[int(len(r["connect_ms"]) * 0.9)]
        out[name] = {"connect_ms_median": round(med["connect_ms"], 2), "connect_ms_p90": round(p90, 2),
                     "js_publish_msgs_s": round(med["publish"]), "sdk_msgs_s": round(med["sdk"]),
                     "connect_ratio": round(med["connect_ms"] / base["connect_ms"], 2),
                     "js_publish_ratio": round(med["publish"] / base["publish"], 3),
                     "sdk_ratio": round(med["sdk"] / base["sdk"], 3)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connects", type=int, default=100)
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--payload", type=int, default=256)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    logging.getLogger("asyncio").setLevel(logging.ERROR)  # nats-py + ssl: "returning true from eof_received()"
    out = asyncio.run(run(args))
    print(out["setup"])
    print(f"{'server':<9}{'connect ms':>12}{'p90':>8}{'x none':>8}{'js.publish/s':>14}{'x none':>8}"
          f"{'SDK msgs/s':>12}{'x none':>8}")
    for name in ("none", "jwt", "tls", "jwt+tls"):
        r = out[name]
        print(f"{name:<9}{r['connect_ms_median']:>12.2f}{r['connect_ms_p90']:>8.2f}{r['connect_ratio']:>8.2f}"
              f"{r['js_publish_msgs_s']:>14,}{r['js_publish_ratio']:>8.2f}{r['sdk_msgs_s']:>12,}{r['sdk_ratio']:>8.2f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
