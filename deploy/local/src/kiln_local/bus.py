"""``kiln up``'s NATS identities (docs/nats-auth.md): each service on its own creds, the bus provisioned first.

The bundled nats-server runs in operator mode with a trust chain kept in ``<data dir>/secrets/nats`` (mode 0700;
made on the first start, re-minted per role when the code's rights change).  An existing server (``--nats-url``)
takes the services' creds from ``--nats-creds-dir``: either such a trust directory (``trust.json``, ``creds/``,
``keys/``) or a flat folder of ``<role>.creds`` files, with ``trainer.nk`` and ``account.pub`` where the runners
should mint per-attempt trainer creds.

Example:
    >>> import tempfile, pathlib
    >>> bus = Identities.bundled(pathlib.Path(tempfile.mkdtemp()) / "nats", ("default",))
    >>> sorted(bus.env("KILN_WRITER", "metrics-writer"))
    ['KILN_WRITER_NATS_CREDS_FILE']
    >>> sorted(bus.runner_env("default"))
    ['KILN_RUNNER_NATS_ACCOUNT', 'KILN_RUNNER_NATS_CREDS_FILE', 'KILN_RUNNER_TRAINER_SIGNING_SEED_FILE']
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kiln_contracts.natsauth import permissions
from kiln_contracts.natsauth.client import NatsTls
from kiln_contracts.natsauth.server import TlsFiles, server_config
from kiln_contracts.natsauth.trust import TrustChain, load_trust, setup_trust, write_secret

PROVISIONER = permissions.provisioner()
SERVICE_PREFIXES = ("KILN_API", "KILN_RUNNER", "KILN_WRITER", "KILN_NOTIFIER", "KILN_CLEARML")


@dataclass(frozen=True)
class BusTls:
    """TLS on the bundled server: its certificate and key, the CA its clients' certificates must come from (with
    ``server.verify``), and the files every service and trainer connects with."""

    server: TlsFiles
    client: NatsTls

    def env(self, prefix: str) -> dict[str, str]:
        """A service's ``<prefix>_NATS_TLS_*`` settings."""
        files = (self.client.ca_file, self.client.cert_file, self.client.key_file)
        names = ("CA_FILE", "CERT_FILE", "KEY_FILE")
        return {f"{prefix}_NATS_TLS_{n}": str(f) for n, f in zip(names, files, strict=True) if f is not None}


def runner_role(pool: str) -> str:
    return permissions.runner(pool).name


@dataclass
class Identities:
    """Where each service's creds are; ``chain`` is set when the folder is a whole trust chain."""

    root: Path
    chain: TrustChain | None = None
    tls: BusTls | None = None

    @classmethod
    def bundled(cls, root: Path, pools: tuple[str, ...]) -> Identities:
        """The trust chain of the bundled server: made or loaded, each pool's roles current."""
        return cls(root, setup_trust(root, pools))

    @classmethod
    def given(cls, root: Path) -> Identities:
        """An operator's folder for ``--nats-url``: a trust directory or a flat folder of ``<role>.creds``."""
        root = Path(root).resolve()
        if not root.is_dir():
            raise SystemExit(f"--nats-creds-dir {root}: no such folder")
        return cls(root, load_trust(root) if (root / "trust.json").exists() else None)

    def creds(self, role: str, required: bool = True) -> Path | None:
        path = self.chain.creds_path(role) if self.chain else self.root / f"{role}.creds"
        if path.exists():
            return path
        if required:
            raise SystemExit(f"no NATS creds for {role}: {path} is missing")
        return None

    def env(self, prefix: str, role: str) -> dict[str, str]:
        """A service's creds setting (its inbox prefix defaults to its role's own) and TLS files."""
        return {f"{prefix}_NATS_CREDS_FILE": str(self.creds(role)), **(self.tls.env(prefix) if self.tls else {})}

    def runner_env(self, pool: str) -> dict[str, str]:
        """The runner's creds and, where there is one, the trainer signing key: every attempt gets its own creds."""
        env = self.env("KILN_RUNNER", runner_role(pool))
        if self.chain:
            seed, account = self.chain.seed_path(permissions.TRAINER.role), self.chain.account
        else:
            seed = self.root / f"{permissions.TRAINER.role}.nk"
            account = (self.root / "account.pub").read_text().strip() if (self.root / "account.pub").exists() else ""
        if seed.exists() and account:
            env |= {"KILN_RUNNER_TRAINER_SIGNING_SEED_FILE": str(seed), "KILN_RUNNER_NATS_ACCOUNT": account}
        return env

    def api_env(self) -> dict[str, str]:
        """The API's creds and, with a whole trust chain, the folder that lets it issue third-party creds."""
        env = self.env("KILN_API", "api")
        if self.chain:
            env["KILN_API_NATS_TRUST_DIR"] = str(self.chain.root)
        return env

    def write_server_config(self, path: Path, *, port: int, store_dir: Path) -> Path:
        """The bundled server's configuration (operator mode, full resolver, JetStream), mode 0600."""
        assert self.chain is not None
        tls = self.tls.server if self.tls else None
        return write_secret(path, server_config(self.chain, port=port, store_dir=store_dir, tls=tls))

    def provision(self, url: str, pools: tuple[str, ...], timeout: float = 20.0) -> bool:
        """Create or update the streams, buckets and service durables with the provisioner's creds; False when
        this folder has none (an operator provisions an existing server; the services then wait for it)."""
        creds = self.creds(PROVISIONER.name, required=False)
        if creds is None:
            return False
        # Its own thread and loop: start() may be called from a coroutine (the tests do).
        tls = self.tls.client if self.tls else None
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, _provision(url, creds, pools, timeout, tls)).result()
        return True


async def _provision(url: str, creds: Path, pools: tuple[str, ...], timeout: float, tls: NatsTls | None) -> None:
    import nats

    from kiln_contracts.natsauth.client import connect_options, servers
    from kiln_contracts.natsauth.provision import provision

    nc = await nats.connect(servers(url), name="kiln-provision", connect_timeout=timeout, allow_reconnect=False,
                            **connect_options(creds, PROVISIONER.inbox, tls))
    try:
        await provision(nc.jetstream(timeout=timeout), pools)
    finally:
        await nc.close()
