"""The trust chain on disk: operator, system account, the KILN account with its signing keys, service creds.

Layout of ``root`` (what ``kiln up`` keeps under its data directory)::

    trust.json                 public keys, revocations, the account JWT's last issue time (nothing secret)
    keys/<name>.nk             seeds, mode 0600: operator, operator-signing, system, services, trainer, third-party
    jwt/operator.jwt           the operator JWT the server is configured with
    creds/<role>.creds         mode 0600: one per service role, sys.creds for the revocation pushes

Who needs which seed: the operator signing key re-signs the account JWT (revocations); the ``services`` key signs
service users (setup only); the scoped ``trainer`` key goes to runners, the scoped ``third-party`` key to the API.
The operator's own key and the system account's key are needed only to redo the chain: keep them offline.
The KILN account's own key signs nothing (users are signed by its signing keys) and is not kept at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from . import jsapi
from . import jwt as nj
from .permissions import SCOPES, Role, Scope, service_roles

ACCOUNT_NAME, SYSTEM_NAME, OPERATOR_NAME = "KILN", "SYS", "kiln"
SERVICES_KEY = "services"
SYS_ROLE = "sys"
_SEEDS = ("operator", "operator-signing", "system", SERVICES_KEY, *(s.role for s in SCOPES))


def digest(obj: Any) -> str:
    """A short fingerprint of a JSON-able value (what was last minted or signed, kept in trust.json)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def write_secret(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` with mode 0600 from the start (never world-readable, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return path


def scope_entry(scope: Scope, key: str) -> dict[str, Any]:
    """The account JWT's ``signing_keys`` entry of a scoped key."""
    block = nj.permission_block(scope.pub_allow, scope.sub_allow, subs=scope.subs, payload=scope.payload,
                                conn_types=list(scope.conn_types))
    return nj.user_scope(key, scope.role, block, scope.purpose)


@dataclass
class TrustChain:
    """A trust chain kept in ``root``; :func:`setup_trust` makes or loads one."""

    root: Path
    state: dict[str, Any]
    _lock: FileLock | None = field(default=None, repr=False, compare=False)

    @contextmanager
    def transaction(self) -> Iterator[dict[str, Any]]:
        """Read trust.json afresh under a file lock, yield its state to change, save it: two processes (``kiln up``
        re-minting a role, the API revoking a user) never lose each other's change.  Reentrant."""
        if self._lock is None:
            self._lock = FileLock(str(self.root / ".trust.lock"))
        outer = self._lock.is_locked
        with self._lock:
            if not outer:
                self.state = json.loads((self.root / "trust.json").read_text())
            yield self.state
            if not outer:
                self.save()

    @property
    def account(self) -> str:
        """The KILN account's public key (users name it as ``issuer_account``)."""
        return str(self.state["account"])

    @property
    def system_account(self) -> str:
        return str(self.state["system_account"])

    def key(self, name: str) -> nj.Key:
        return nj.Key((self.root / "keys" / f"{name}.nk").read_text().strip())

    def seed_path(self, name: str) -> Path:
        """Where the seed of ``name`` lies (e.g. ``trainer``: hand that file to the runners)."""
        return self.root / "keys" / f"{name}.nk"

    def creds_path(self, role: str) -> Path:
        return self.root / "creds" / f"{role}.creds"

    @property
    def operator_jwt_path(self) -> Path:
        return self.root / "jwt" / "operator.jwt"

    def save(self) -> None:
        (self.root / "trust.json").write_text(json.dumps(self.state, indent=2, sort_keys=True) + "\n")

    def system_account_jwt(self) -> str:
        claims = nj.account_claims(self.system_account, SYSTEM_NAME)
        return nj.encode(claims, self.key("operator-signing"), iat=int(self.state["created"]))

    def _account_claims(self) -> dict[str, Any]:
        keys = self.state["signing_keys"]
        signing: list[str | dict[str, Any]] = [keys[SERVICES_KEY], *(scope_entry(s, keys[s.role]) for s in SCOPES)]
        revoked = {pub: int(r["at"]) for pub, r in self.state["revocations"].items()}
        return nj.account_claims(self.account, ACCOUNT_NAME, jetstream=nj.jetstream_limits(),
                                 signing_keys=signing, revocations=revoked)

    def account_jwt(self, *, reissue: bool = False) -> str:
        """The KILN account JWT: JetStream on, the signing keys (scoped ones with their templates), revocations.

        ``reissue`` gives it a new, strictly later issue time (saved): a dir resolver keeps the newest JWT it was
        given, so a pushed update must be later than the last one, and later than the one in ``resolver_preload``.
        A change of its content (a template changed in the code) also reissues it.
        """
        claims = self._account_claims()
        if reissue or self.state.get("account_digest") != digest(claims):
            with self.transaction() as state:
                claims = self._account_claims()  # from the state on disk: another process may have revoked
                state["account_iat"] = max(int(time.time()), int(state["account_iat"]) + 1)
                state["account_digest"] = digest(claims)
        return nj.encode(claims, self.key("operator-signing"), iat=int(self.state["account_iat"]))

    def service_creds(self, role: Role, expires_at: int | None = None) -> Path:
        """Mint a user for a service ``role`` (signed by the unscoped ``services`` key) into its creds file."""
        user = nj.Key.new("user")
        perms = nj.permission_block(role.pub_allow, role.sub_allow, pub_deny=role.pub_deny)
        claims = nj.user_claims(user.public_key, role.name, issuer_account=self.account, permissions=perms,
                                expires_at=expires_at)
        token = nj.encode(claims, self.key(SERVICES_KEY))
        with self.transaction() as state:
            path = write_secret(self.creds_path(role.name), nj.creds_text(token, user))
            state.setdefault("roles", {})[role.name] = {"user": user.public_key, "rights": digest(perms)}
        return path

    def creds_current(self, role: Role) -> bool:
        """Whether ``role``'s creds file exists and was minted with the rights the code gives the role now."""
        perms = nj.permission_block(role.pub_allow, role.sub_allow, pub_deny=role.pub_deny)
        minted = self.state.get("roles", {}).get(role.name, {})
        return self.creds_path(role.name).exists() and minted.get("rights") == digest(perms)

    def sys_creds(self) -> Path:
        """The system-account user that pushes account JWTs ($SYS.REQ.CLAIMS.UPDATE) and nothing else."""
        user = nj.Key.new("user")
        inbox = jsapi.inbox_prefix(SYS_ROLE)
        perms = nj.permission_block(["$SYS.REQ.CLAIMS.UPDATE", "$SYS.REQ.ACCOUNT.*.CLAIMS.UPDATE"],
                                    [jsapi.inbox_sub(inbox)])
        token = nj.encode(nj.user_claims(user.public_key, SYS_ROLE, permissions=perms), self.key("system"))
        return write_secret(self.creds_path(SYS_ROLE), nj.creds_text(token, user))


def load_trust(root: Path) -> TrustChain:
    root = Path(root)
    return TrustChain(root, json.loads((root / "trust.json").read_text()))


def setup_trust(root: Path, pools: tuple[str, ...] = ("default",)) -> TrustChain:
    """Make the trust chain in ``root``, or load the one there; either way every service role of ``pools`` has
    creds with its current rights afterwards (a new pool, or a role whose rights changed in the code, gets new
    creds; the others are kept; the old user of a re-minted role stays valid until revoked).  Returns the chain."""
    root = Path(root)
    if (root / "trust.json").exists():
        chain = load_trust(root)
    else:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        keys = {name: nj.Key.new("operator" if name == "operator" else "account") for name in _SEEDS}
        keys["operator-signing"] = nj.Key.new("operator")
        for name, k in keys.items():
            write_secret(root / "keys" / f"{name}.nk", k.seed + "\n")
        now = int(time.time())
        chain = TrustChain(root, {
            "operator": keys["operator"].public_key, "system_account": keys["system"].public_key,
            "account": nj.Key.new("account").public_key,
            "signing_keys": {n: keys[n].public_key for n in (SERVICES_KEY, *(s.role for s in SCOPES))},
            "operator_signing_key": keys["operator-signing"].public_key,
            "revocations": {}, "created": now, "account_iat": now,
        })
        chain.save()
        op = nj.operator_claims(keys["operator"], OPERATOR_NAME, system_account=chain.system_account,
                                signing_keys=[keys["operator-signing"].public_key])
        chain.operator_jwt_path.parent.mkdir(parents=True, exist_ok=True)
        chain.operator_jwt_path.write_text(nj.encode(op, keys["operator"], iat=now) + "\n")
        chain.sys_creds()
    for role in service_roles(pools):
        if not chain.creds_current(role):
            chain.service_creds(role)
    return chain
