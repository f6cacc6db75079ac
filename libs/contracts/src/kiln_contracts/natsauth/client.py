"""A service's own NATS identity (opt-in): its creds and inbox prefix; streams checked, never created.

Without a creds file the service connects as before and creates or updates the streams itself.  With one, the
server gives it only its role's rights (``kiln_contracts.natsauth.permissions``): the provisioner has made the
streams and buckets, and the service only checks that they are there (``STREAM.INFO``).  It still creates or
updates its own durables: its creds pin their names and filters.

Used by the runner, the metrics-writer, the ClearML forwarder and the notifier.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext
from pydantic import BaseModel, Field, FilePath, model_validator

from .. import streams
from .permissions import Role
from .provision import missing_streams

log = logging.getLogger("kiln.nats")
PROVISION_HINT = ("run the provisioning step first (`kiln up` does it; or kiln_contracts.natsauth.provision."
                  "provision() with the provisioner's creds)")


def inbox_prefix(configured: str | None, creds_file: Path | None, role: Role) -> str | None:
    """The inbox prefix to connect with: the configured one, else with creds the role's own, else nats-py's."""
    return configured or (role.inbox if creds_file is not None else None)


TLS_ENV = ("KILN_NATS_TLS_CA_FILE", "KILN_NATS_TLS_CERT_FILE", "KILN_NATS_TLS_KEY_FILE")


def servers(url: str) -> list[str]:
    """Every server of a comma-separated NATS URL list: clients take them all and reconnect to a surviving one.

    Example:
        >>> servers("nats://n1:4222, nats://n2:4222,"), servers("tls://n1:4222")
        (['nats://n1:4222', 'nats://n2:4222'], ['tls://n1:4222'])
    """
    found = [u.strip() for u in url.split(",") if u.strip()]
    if not found:
        raise ValueError("no NATS server URL given")
    return found


@dataclass(frozen=True)
class NatsTls:
    """TLS of a NATS client: the CA that signed the servers' certificates, and for servers that verify clients
    (mutual TLS) this host's certificate and key.  Files, re-read at every connect: a renewal needs no restart.

    Example:
        >>> NatsTls().context() is None, NatsTls.from_env({"KILN_NATS_TLS_CA_FILE": "/etc/kiln/ca.pem"}).ca_file
        (True, PosixPath('/etc/kiln/ca.pem'))
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a NATS client certificate needs its key file too (and the other way round)")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> NatsTls:
        """From ``KILN_NATS_TLS_CA_FILE`` / ``_CERT_FILE`` / ``_KEY_FILE`` (what a runner hands its trainers)."""
        ca, cert, key = (Path(env[k]) if env.get(k) else None for k in TLS_ENV)
        return cls(ca, cert, key)

    def env(self) -> dict[str, str]:
        """The variables :meth:`from_env` reads, for the ones set."""
        files = (self.ca_file, self.cert_file, self.key_file)
        return {k: str(v) for k, v in zip(TLS_ENV, files, strict=True) if v is not None}

    def context(self) -> ssl.SSLContext | None:
        """The client context, or None when nothing is set (then a ``tls://`` URL uses the system's CAs)."""
        if self.ca_file is None and self.cert_file is None:
            return None
        ctx = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file is not None and self.key_file is not None:
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        return ctx


class NatsTlsSettings(BaseModel):
    """The TLS settings every service shares (mixed into its pydantic-settings class, so each reads them with its
    own prefix: ``KILN_RUNNER_NATS_TLS_CA_FILE``, ...).  Unset: plain ``nats://``, or the system CAs for ``tls://``."""

    nats_tls_ca_file: FilePath | None = Field(
        None, description="CA of the NATS servers' certificates (PEM); with it the client verifies them.")
    nats_tls_cert_file: FilePath | None = Field(
        None, description="This host's client certificate, for servers that verify clients (mutual TLS).")
    nats_tls_key_file: FilePath | None = Field(None, description="The key of nats_tls_cert_file (mode 0600).")

    @model_validator(mode="after")
    def _pair(self) -> NatsTlsSettings:
        self.nats_tls  # noqa: B018 - a certificate without its key (or the other way round) is refused at start
        return self

    @property
    def nats_tls(self) -> NatsTls:
        return NatsTls(self.nats_tls_ca_file, self.nats_tls_cert_file, self.nats_tls_key_file)


def connect_options(creds_file: Path | None, inbox: str | None, tls: NatsTls | None = None) -> dict[str, Any]:
    """``nats.connect`` keywords: only those set, so that without an identity it connects exactly as before."""
    options: dict[str, Any] = {"user_credentials": str(creds_file)} if creds_file is not None else {}
    if inbox:
        options["inbox_prefix"] = inbox
    context = tls.context() if tls is not None else None
    if context is not None:
        options["tls"] = context
    return options


async def prepare_streams(js: JetStreamContext, creds_file: Path | None, names: tuple[str, ...],
                          wait_s: float) -> None:
    """Without creds create or update every stream (as before); with creds wait for ``names`` to exist."""
    if creds_file is None:
        await streams.ensure_streams(js)
        return
    await require_streams(js, names, wait_s)


async def require_streams(js: JetStreamContext, names: tuple[str, ...], wait_s: float, every_s: float = 2.0) -> None:
    """Return once every stream of ``names`` exists; after ``wait_s`` raise, saying what is missing and what to do."""
    deadline = time.monotonic() + wait_s
    while missing := await missing_streams(js, names):
        problem = f"NATS streams missing: {', '.join(missing)}; this identity may not create them: {PROVISION_HINT}"
        if time.monotonic() >= deadline:
            raise RuntimeError(problem)
        log.warning("%s; checking again in %gs", problem, every_s)
        await asyncio.sleep(every_s)
