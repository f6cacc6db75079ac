"""Minting users with a scoped signing key: needs that key's seed and the account's public key, nothing else.

A user signed by a scoped key carries no permissions of its own: the server gives it the key's template
(:data:`~kiln_contracts.natsauth.permissions.TRAINER`, :data:`~kiln_contracts.natsauth.permissions.THIRD_PARTY`)
with the user's tags filled in.  So a runner holding the trainer key can mint trainer-shaped users only, for any
project and job but never with more rights than a trainer; and nothing has to change on the server: it checks the
chain user -> signing key -> account -> operator at each connect.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from .. import subjects
from . import jsapi
from . import jwt as nj
from .permissions import THIRD_PARTY, TRAINER, third_party_durable

# A third party's consumer name has no '-', so that tp-<project>-<consumer> names one (project, consumer) pair.
_CONSUMER = re.compile(r"^[a-z0-9]{1,32}$")


@dataclass(frozen=True)
class Minted:
    """A minted user: ``creds`` is the ``.creds`` text (secret); the client connects with it and with
    ``nats.connect(inbox_prefix=inbox_prefix)``; ``public_key`` is what :func:`revoke` takes."""

    creds: str
    public_key: str
    inbox_prefix: str
    expires_at: int | None
    name: str


def _mint(scoped_seed: str, account: str, name: str, tags: list[str], expires_at: int | None) -> Minted:
    signer = nj.Key(scoped_seed.strip())
    user = nj.Key.new("user")
    claims = nj.user_claims(user.public_key, name, issuer_account=account, tags=tags, expires_at=expires_at)
    token = nj.encode(claims, signer)
    return Minted(nj.creds_text(token, user), user.public_key, jsapi.inbox_prefix(user.public_key), expires_at, name)


def mint_trainer(scoped_seed: str, account: str, project: str, job: str, expires_at: int, *,
                 attempt: int | None = None) -> Minted:
    """Creds for one trainer attempt: publish ``kiln.evt.<project>.<job>.>`` and ``kiln.log.<project>.<job>``,
    receive acks under its inbox prefix, until ``expires_at`` (Unix seconds; the server closes the connection then).

    Args:
        scoped_seed: seed of the ``trainer`` scoped signing key (the runner's only NATS secret besides its creds).
        account: public key of the KILN account.
        project, job: subject tokens of the job.
        expires_at: the attempt's deadline (spawn time + timeout + grace).

    Example:
        >>> from kiln_contracts.natsauth.jwt import Key, decode, parse_creds
        >>> m = mint_trainer(Key.new("account").seed, Key.new("account").public_key, "p1", "j1", 2_000_000_000)
        >>> decode(parse_creds(m.creds)[0])["nats"]["tags"]
        ['project:p1', 'job:j1']
    """
    subjects.log(project, job)  # validates both tokens
    if expires_at <= time.time():
        raise ValueError("expires_at is in the past")
    suffix = f"/{attempt}" if attempt is not None else ""
    return _mint(scoped_seed, account, f"{TRAINER.role}/{project}/{job}{suffix}",
                 [f"project:{project}", f"job:{job}"], int(expires_at))


def mint_third_party(scoped_seed: str, account: str, project: str, consumer: str,
                     expires_at: int | None = None) -> Minted:
    """Creds for a third-party reader of ``project``: fetch and ack from the durables ``tp-<project>-<consumer>``
    on the event and log streams, which Kiln creates beforehand (:func:`~.provision.third_party_consumers`).

    ``consumer`` is lowercase letters and digits (no ``-``: the durable name must be unambiguous).
    """
    subjects.project_events(project)
    if not _CONSUMER.match(consumer):
        raise ValueError(f"consumer name must be 1-32 lowercase letters or digits: {consumer!r}")
    subjects.token(third_party_durable(project, consumer))
    return _mint(scoped_seed, account, f"{THIRD_PARTY.role}/{project}/{consumer}",
                 [f"project:{project}", f"consumer:{consumer}"], int(expires_at) if expires_at else None)
