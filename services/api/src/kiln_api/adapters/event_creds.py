"""Third-party event credentials, NATS side: the reader's durables, its creds, and cutting it off.

Everything here is ``kiln_contracts.natsauth``: the API creates the durables ``tp-<project>-<name>`` with its own
creds (its rights pin their filter to the project), mints the reader with the ``third-party`` scoped key (the
reader gets fetch and ack on those durables, nothing else), and revokes by re-signing the account JWT with the
operator signing key and pushing it with the system user (docs/nats-auth.md, "Revocation").
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from nats.js import JetStreamContext

from kiln_contracts import streams
from kiln_contracts.natsauth import jwt as nj
from kiln_contracts.natsauth import client as identity
from kiln_contracts.natsauth import provision, server
from kiln_contracts.natsauth.client import NatsTls
from kiln_contracts.natsauth.mint import Minted, mint_third_party
from kiln_contracts.natsauth.permissions import THIRD_PARTY
from kiln_contracts.natsauth.trust import SYS_ROLE, load_trust

from ..settings import Settings

log = logging.getLogger("kiln.api.event_creds")
SIGNING_KEY = "operator-signing"


class NotConfigured(RuntimeError):
    """The trust directory lacks what issuing or revoking needs."""


@dataclass(frozen=True)
class Issued:
    """A new reader: ``minted.creds`` is the secret, shown once; ``durables`` what it may read through."""

    minted: Minted
    durables: tuple[streams.Durable, ...]


class ThirdPartyIssuer:
    """Issues and revokes read-only event credentials; one per API process (revocations are serialised)."""

    def __init__(self, seed: str, account: str, trust_dir: Path, servers: list[str], public_urls: list[str],
                 tls: NatsTls | None = None) -> None:
        self._seed = seed
        self.account = account
        self.trust_dir = trust_dir
        self.servers = servers
        self.tls = tls
        self.public_urls = public_urls
        self._lock = asyncio.Lock()
        self.changing = asyncio.Lock()  # one check-then-create or check-then-revoke at a time

    @classmethod
    def from_settings(cls, settings: Settings) -> ThirdPartyIssuer | None:
        """The issuer the settings describe, None when they describe none; raises :class:`NotConfigured` on a
        trust directory that cannot issue or revoke (checked at start, not at the first request)."""
        root = settings.nats_trust_dir
        if root is None:
            return None
        try:
            chain = load_trust(root)
        except FileNotFoundError:
            raise NotConfigured(f"no trust.json in nats_trust_dir {root}") from None
        seed_file = settings.nats_third_party_seed_file or chain.seed_path(THIRD_PARTY.role)
        for path in (seed_file, chain.seed_path(SIGNING_KEY), chain.creds_path(SYS_ROLE)):
            if not os.access(path, os.R_OK):
                raise NotConfigured(f"cannot read {path}: issuing and revoking event credentials need the "
                                    "third-party seed, the operator signing key and the sys creds")
        seed = seed_file.read_text().strip()
        listed = chain.state["signing_keys"].get(THIRD_PARTY.role)
        if nj.Key(seed).public_key != listed:
            raise NotConfigured(f"{seed_file} is not the account's {THIRD_PARTY.role} signing key")
        account = settings.nats_account or chain.account
        if account != chain.account:
            raise NotConfigured(f"nats_account {account} is not the account of {root}/trust.json")
        return cls(seed, account, root, identity.servers(settings.nats_url), settings.nats_public_urls,
                   settings.nats_tls)

    async def issue(self, js: JetStreamContext, project: str, name: str, expires_at: int) -> Issued:
        """Create the reader's durables (an expired reader's are kept, so renewing resumes where it stopped), then
        mint its creds."""
        durables = await provision.add_third_party(js, project, name)
        return Issued(mint_third_party(self._seed, self.account, project, name, expires_at), durables)

    async def revoke(self, js: JetStreamContext, project: str, name: str, public_key: str, until: int) -> None:
        """Cut the user off everywhere (live connections close at once, connects are refused), then delete its
        durables.  The revocation list lives in ``trust.json``, shared with ``kiln up``: ``server.revoke`` reads it
        fresh under its file lock (and drops the entries whose users have expired anyway), so none is lost."""
        async with self._lock:
            tls = self.tls.context() if self.tls is not None else None
            answer = await server.revoke(load_trust(self.trust_dir), public_key, self.servers, until=until, tls=tls)
        log.info("revoked NATS user %s (%s of project %s): %s", public_key, name, project, answer)
        await provision.remove_third_party(js, project, name)
