"""Secrets of the API: API keys and web session tokens (pure; nothing here touches the database).

An API key is ``kiln_<10 hex>_<43 url-safe chars>``: the first part (``kiln_<10 hex>``) is the key's id, shown in
lists and logs; the rest carries 256 random bits. Only the SHA-256 of the whole key is stored: with that much
entropy a slow password hash would only add latency, and no guess can be checked offline anyway.

Example:
    >>> key = new_api_key()
    >>> key.secret.startswith(key.id + "_") and len(key.id) == 15 and key_id_of(key.secret) == key.id
    True
    >>> key_id_of("kiln_not-a-key") is None
    True
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

KEY_PREFIX = "kiln_"
_KEY = re.compile(r"^(kiln_[0-9a-f]{10})_[A-Za-z0-9_-]{43}$")


@dataclass(frozen=True)
class NewKey:
    id: str
    secret: str
    hash: str


def digest(secret: str) -> str:
    """The stored form of a key or session token."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_api_key() -> NewKey:
    """A fresh API key: shown once to its owner, stored only as :func:`digest`."""
    key_id = KEY_PREFIX + secrets.token_hex(5)
    secret = f"{key_id}_{secrets.token_urlsafe(32)}"
    return NewKey(key_id, secret, digest(secret))


def key_id_of(secret: str) -> str | None:
    """The id part of a well-formed API key, else None (anything else is not one of ours)."""
    m = _KEY.match(secret)
    return m.group(1) if m else None


def matches(secret: str, stored_hash: str) -> bool:
    """Constant-time check of a presented secret against its stored digest."""
    return hmac.compare_digest(digest(secret), stored_hash)


def new_token() -> str:
    """A random session or CSRF token (256 bits)."""
    return secrets.token_urlsafe(32)
