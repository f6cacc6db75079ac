"""NATS JWT v2 minting and checking on top of ``nkeys``: operator, account and user claims, scoped signing keys.

Why not the ``nats-jwt`` package (0.2.2)?  Its account ``signing_keys`` is a plain list of public keys: it cannot
express a *scoped* signing key (``{"kind": "user_scope", "key": ..., "role": ..., "template": {...}}``), which is
what lets a runner hold a key that mints trainer-shaped users only.  The wire format is small, so this module writes
it directly, as ``github.com/nats-io/jwt/v2`` does::

    header  {"typ": "JWT", "alg": "ed25519-nkey"}
    claims  {"jti", "iat", "iss", "sub", "name", "exp"?, "nats": {..., "type", "version": 2}}
    token   b64url(header) "." b64url(claims) "." b64url(ed25519(issuer seed, first two parts))

Example:
    >>> op = Key.new("operator")
    >>> token = encode({"sub": op.public_key, "name": "kiln", "nats": {"type": "operator", "version": 2}}, op)
    >>> verify(token)["iss"] == op.public_key
    True
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import nacl.signing
import nkeys

NO_LIMIT = -1
_PREFIXES = {"operator": nkeys.PREFIX_BYTE_OPERATOR, "account": nkeys.PREFIX_BYTE_ACCOUNT,
             "user": nkeys.PREFIX_BYTE_USER}
_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}


class InvalidJWT(ValueError):
    """A token that is malformed or whose signature does not match its issuer."""


@dataclass(frozen=True)
class Key:
    """An nkey pair held as its seed (``S...``); ``public_key`` starts with O, A or U."""

    seed: str

    @classmethod
    def new(cls, kind: str) -> Key:
        """A fresh random key of ``kind``: ``operator``, ``account`` (also signing keys) or ``user``."""
        return cls(nkeys.encode_seed(os.urandom(32), _PREFIXES[kind]).decode())

    @property
    def _pair(self) -> nkeys.KeyPair:
        return nkeys.from_seed(bytearray(self.seed.encode()))

    @property
    def public_key(self) -> str:
        return str(self._pair.public_key.decode())

    def sign(self, data: bytes) -> bytes:
        return bytes(self._pair.sign(data))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def encode(claims: dict[str, Any], signer: Key, *, iat: int | None = None) -> str:
    """Sign ``claims`` with ``signer``: sets ``iss``, ``iat`` (now unless given) and ``jti``."""
    body = {**claims, "iss": signer.public_key, "iat": iat if iat is not None else int(time.time()), "jti": ""}
    # jti as jwt/v2 makes it: base32 of the SHA-512/256 of the claims without it (the server does not check it).
    body["jti"] = base64.b32encode(hashlib.new("sha512_256", _dumps(body)).digest()).rstrip(b"=").decode()
    signed = f"{_b64(_dumps(_HEADER))}.{_b64(_dumps(body))}"
    return f"{signed}.{_b64(signer.sign(signed.encode()))}"


def decode(token: str) -> dict[str, Any]:
    """The claims of ``token``, unchecked (use :func:`verify` for anything you act on)."""
    try:
        claims = json.loads(_unb64(token.split(".")[1]))
    except (IndexError, ValueError, binascii.Error) as exc:
        raise InvalidJWT(f"not a JWT: {exc}") from exc
    if not isinstance(claims, dict):
        raise InvalidJWT("JWT claims are not an object")
    return claims


def _verify_key(public_key: str) -> nacl.signing.VerifyKey:
    raw = base64.b32decode(public_key + "=" * (-len(public_key) % 8))
    body, crc = raw[:-2], raw[-2:]
    if len(body) != 33 or nkeys.crc16_checksum(body) != crc or body[0] not in _PREFIXES.values():
        raise InvalidJWT(f"not an operator, account or user public key: {public_key}")
    return nacl.signing.VerifyKey(body[1:])


def verify(token: str) -> dict[str, Any]:
    """The claims of ``token`` after checking its signature against its issuer (``iss``); raises InvalidJWT.

    It checks the signature only: whether the issuer is trusted (operator, account or one of its signing keys)
    and whether the token expired is the server's decision, made at every connect.
    """
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidJWT("a JWT has three parts")
    claims = decode(token)
    if json.loads(_unb64(parts[0])).get("alg") != _HEADER["alg"]:
        raise InvalidJWT("not an nkey-signed JWT")
    try:
        _verify_key(str(claims.get("iss", ""))).verify(f"{parts[0]}.{parts[1]}".encode(), _unb64(parts[2]))
    except (nacl.exceptions.BadSignatureError, binascii.Error, ValueError) as exc:
        raise InvalidJWT(f"bad signature: {exc}") from exc
    return claims


def operator_claims(operator: Key, name: str, *, system_account: str, signing_keys: list[str]) -> dict[str, Any]:
    """Operator claims; account JWTs may be signed by the operator key or one of ``signing_keys``."""
    return {"sub": operator.public_key, "name": name,
            "nats": {"type": "operator", "version": 2, "system_account": system_account, "signing_keys": signing_keys}}


def jetstream_limits(*, mem_storage: int = NO_LIMIT, disk_storage: int = NO_LIMIT, streams: int = NO_LIMIT,
                     consumer: int = NO_LIMIT) -> dict[str, Any]:
    """Account JetStream limits (tier-less); any non-zero storage enables JetStream for the account."""
    return {"mem_storage": mem_storage, "disk_storage": disk_storage, "streams": streams, "consumer": consumer,
            "max_ack_pending": NO_LIMIT, "mem_max_stream_bytes": 0, "disk_max_stream_bytes": 0,
            "max_bytes_required": False}


def account_claims(account_public_key: str, name: str, *, jetstream: dict[str, Any] | None = None,
                   signing_keys: list[str | dict[str, Any]] | None = None,
                   revocations: dict[str, int] | None = None) -> dict[str, Any]:
    """Account claims: ``signing_keys`` holds plain public keys and :func:`user_scope` entries;
    ``revocations`` maps a user public key to a time: users of that key issued at or before it are refused."""
    limits: dict[str, Any] = {"subs": NO_LIMIT, "data": NO_LIMIT, "payload": NO_LIMIT, "imports": NO_LIMIT,
                              "exports": NO_LIMIT, "wildcards": True, "conn": NO_LIMIT, "leaf": NO_LIMIT}
    limits.update(jetstream or {})
    nats: dict[str, Any] = {"type": "account", "version": 2, "limits": limits,
                            "default_permissions": {"pub": {}, "sub": {}}}
    if signing_keys:
        nats["signing_keys"] = signing_keys
    if revocations:
        nats["revocations"] = dict(revocations)
    return {"sub": account_public_key, "name": name, "nats": nats}


def user_scope(signing_key: str, role: str, template: dict[str, Any], description: str = "") -> dict[str, Any]:
    """A scoped signing key entry of an account's ``signing_keys``: users it signs get ``template`` as their
    permissions and limits (``{{tag(x)}}``, ``{{subject()}}`` ... filled in per user by the server)."""
    return {"kind": "user_scope", "key": signing_key, "role": role, "template": template, "description": description}


def permission_block(pub_allow: list[str], sub_allow: list[str], *, pub_deny: list[str] | None = None,
                     sub_deny: list[str] | None = None, subs: int = NO_LIMIT, payload: int = NO_LIMIT,
                     data: int = NO_LIMIT, conn_types: list[str] | None = None) -> dict[str, Any]:
    """Permissions and limits as a user JWT or a scope template spells them."""
    block: dict[str, Any] = {
        "pub": {"allow": pub_allow, **({"deny": pub_deny} if pub_deny else {})},
        "sub": {"allow": sub_allow, **({"deny": sub_deny} if sub_deny else {})},
        "subs": subs, "data": data, "payload": payload,
    }
    if conn_types:
        block["allowed_connection_types"] = conn_types
    return block


def user_claims(user_public_key: str, name: str, *, issuer_account: str | None = None,
                permissions: dict[str, Any] | None = None, tags: list[str] | None = None,
                expires_at: int | None = None) -> dict[str, Any]:
    """User claims.  A user signed by a *scoped* key must carry no ``permissions`` (the server refuses it:
    "scoped users require no permissions or limits set"); it gets the scope's template instead.
    ``issuer_account`` is the account's public key when a signing key (not the account key) signs."""
    nats: dict[str, Any] = {"type": "user", "version": 2, **(permissions or {})}
    if issuer_account:
        nats["issuer_account"] = issuer_account
    if tags:
        nats["tags"] = tags
    claims: dict[str, Any] = {"sub": user_public_key, "name": name, "nats": nats}
    if expires_at is not None:
        claims["exp"] = int(expires_at)
    return claims


_CREDS = """-----BEGIN NATS USER JWT-----
{jwt}
------END NATS USER JWT------

************************* IMPORTANT *************************
NKEY Seed printed below can be used to sign and prove identity.
NKEYs are sensitive and should be treated as secrets.

-----BEGIN USER NKEY SEED-----
{seed}
------END USER NKEY SEED------

*************************************************************
"""


def creds_text(user_jwt: str, user: Key) -> str:
    """A ``.creds`` file's text (the format of ``nsc``, read by every NATS client)."""
    return _CREDS.format(jwt=user_jwt, seed=user.seed)


def parse_creds(text: str) -> tuple[str, Key]:
    """The user JWT and key of a ``.creds`` text."""
    lines = [ln.strip() for ln in text.splitlines()]
    try:
        token = lines[lines.index("-----BEGIN NATS USER JWT-----") + 1]
        seed = lines[lines.index("-----BEGIN USER NKEY SEED-----") + 1]
    except (ValueError, IndexError) as exc:
        raise InvalidJWT("not a NATS .creds text") from exc
    return token, Key(seed)
