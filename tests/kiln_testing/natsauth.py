"""A real nats-server in operator mode with the generated trust chain and configuration (JWT auth on), a client
that records the server's permission violations, and a private CA for TLS."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
import subprocess
import time
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import RawCredentials

from kiln_contracts.natsauth import jsapi
from kiln_contracts.natsauth.permissions import Role, service_roles
from kiln_contracts.natsauth.server import TlsFiles, TrustChain, setup_trust, write_server_config
from kiln_contracts.natsauth.trust import write_secret

from . import free_port, nats_server_bin, stop_process, wait_for_port


@dataclass
class AuthNats:
    """The server, its trust chain, and per service role the creds file and the inbox prefix to connect with."""

    chain: TrustChain
    conf: Path
    port: int
    pools: tuple[str, ...]
    scheme: str = "nats"
    proc: subprocess.Popen[bytes] | None = None
    inboxes: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.conf.with_suffix(".log")

    def creds(self, role: str) -> str:
        return str(self.chain.creds_path(role))

    def connect_options(self, role: str) -> dict[str, str]:
        """``nats.connect`` keywords of a service role: its creds and its own inbox prefix."""
        return {"user_credentials": self.creds(role), "inbox_prefix": self.inboxes[role], "name": role}

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([nats_server_bin(), "-c", str(self.conf)], stdout=log,
                                         stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.proc, self.log_path)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def make_auth_nats(root: Path, pools: tuple[str, ...] = ("default",), *, tls: TlsFiles | None = None,
                   port: int | None = None) -> AuthNats:
    """Trust chain and server config under ``root`` (not started)."""
    chain = setup_trust(root / "trust", pools)
    port = port or free_port()
    conf = write_server_config(chain, root / "nats-server.conf", port=port, store_dir=root / "jetstream", tls=tls)
    server = AuthNats(chain, conf, port, pools, scheme="tls" if tls else "nats")
    server.inboxes = {r.name: r.inbox for r in service_roles(pools)}
    return server


@contextmanager
def auth_nats(root: Path, pools: tuple[str, ...] = ("default",), *, tls: TlsFiles | None = None) -> Iterator[AuthNats]:
    """A started :class:`AuthNats`, stopped on exit."""
    server = make_auth_nats(root, pools, tls=tls)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Client:
    """A nats-py connection that keeps what the server said asynchronously.

    nats-py reports a permission violation only to ``error_cb`` ("permissions violation for publish to ...", the
    subject lowercased); the call itself returns normally (core publish, subscribe) or times out (``js.publish``,
    requests).  An authorization error (expired, revoked) closes the client instead: ``closed_at`` and
    ``nc.last_error`` say so.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.errors: list[str] = []
        self.closed_at: float | None = None  # time.monotonic()
        self.closed_wall: float | None = None  # time.time(), to compare with a JWT's exp
        self.nc: nats.NATS = nats.NATS()

    async def connect(self, url: str, creds: str, inbox_prefix: str, **options: Any) -> Client:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        async def on_closed() -> None:
            self.closed_at, self.closed_wall = time.monotonic(), time.time()

        user = RawCredentials(creds) if creds.startswith("-----") else creds
        await self.nc.connect(url, user_credentials=user, inbox_prefix=inbox_prefix, error_cb=on_error,
                              closed_cb=on_closed, name=self.label, **options)
        return self

    @property
    def js(self) -> Any:
        return self.nc.jetstream(timeout=2.0)

    def violations(self) -> list[str]:
        return [e for e in self.errors if "permissions violation" in e]

    async def refused(self, call: Awaitable[Any], timeout: float = 3.0) -> str:
        """Run ``call`` until the server reports a violation for it; return that violation, raise if none came.

        A refused ``js.publish`` or request would wait for its timeout: it is cancelled once the violation is in.
        """
        before = len(self.violations())
        task = asyncio.ensure_future(call)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.violations()) == before:
            if task.done():
                await self.nc.flush(timeout=2)  # a core publish/subscribe: its -ERR is behind this PONG
                if len(self.violations()) > before:
                    break
            await asyncio.sleep(0.01)
        task.cancel()
        outcome = await asyncio.gather(task, return_exceptions=True)
        if len(self.violations()) == before:
            raise AssertionError(f"{self.label}: the server refused nothing (the call gave {outcome[0]!r})")
        return self.violations()[-1]

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.close()


async def client(server: AuthNats, role: str, **options: Any) -> Client:
    """A :class:`Client` of a service ``role`` of ``server``."""
    opts = server.connect_options(role)
    return await Client(role).connect(server.url, opts["user_credentials"], opts["inbox_prefix"], **options)


OBSERVER = "test-observer"


def observer_options(chain: TrustChain) -> dict[str, str]:
    """``nats.connect`` keywords of a test-only user with every right, minted in ``chain`` (e.g. a ``kiln up``
    stack's, ``stack.bus.chain``): the tests' own eyes on the streams, never a Kiln role."""
    role = Role(OBSERVER, "tests only", [">"], [">"], inbox=jsapi.inbox_prefix(OBSERVER))
    return {"user_credentials": str(chain.service_creds(role)), "inbox_prefix": role.inbox, "name": OBSERVER}


def add_observer(server: AuthNats) -> str:
    """:func:`observer_options` on a test server; :func:`client` connects as it under the name :data:`OBSERVER`."""
    options = observer_options(server.chain)
    server.inboxes[OBSERVER] = options["inbox_prefix"]
    return options["user_credentials"]


@dataclass
class PrivateCA:
    """A CA with a server certificate (localhost, 127.0.0.1) and a client certificate, as PEM files in ``root``."""

    root: Path

    def server_tls(self) -> TlsFiles:
        return TlsFiles(self.root / "server.pem", self.root / "server-key.pem", self.root / "ca.pem", verify=True)

    def client_context(self, cert: str | None = "client") -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.root / "ca.pem"))
        if cert:
            ctx.load_cert_chain(str(self.root / f"{cert}.pem"), str(self.root / f"{cert}-key.pem"))
        return ctx


def make_ca(root: Path, name: str = "kiln-test-ca") -> PrivateCA:
    """Make a CA, a server and a client certificate (ECDSA P-256, valid one day) under ``root``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    root.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def cert(cn: str, issuer: Any, issuer_key: Any, *, ca: bool = False, server: bool = False) -> Any:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:  # a server's certificate also serves its outgoing cluster routes: client usage too
            usage = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
            b = b.add_extension(x509.ExtendedKeyUsage([*usage, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        if server:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        signed = b.sign(issuer_key or key, hashes.SHA256())
        return key, signed

    def write(stem: str, key: Any, crt: Any) -> None:
        (root / f"{stem}.pem").write_bytes(crt.public_bytes(serialization.Encoding.PEM))
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        write_secret(root / f"{stem}-key.pem", key_pem.decode())

    ca_key, ca_cert = cert(name, None, None, ca=True)
    write("ca", ca_key, ca_cert)
    write("server", *cert("nats.kiln", ca_cert.subject, ca_key, server=True))
    write("client", *cert("kiln-client", ca_cert.subject, ca_key))
    return PrivateCA(root)
