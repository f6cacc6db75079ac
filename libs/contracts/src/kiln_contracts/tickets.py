"""WebSocket tickets: short-lived, signed permissions to watch named jobs and projects.

The notifier has no database, so it cannot look up who a caller is. The API, which can, answers
``POST /api/v1/ws-tickets`` with a ticket: a JWT signed with the API's Ed25519 key (``EdDSA``), at most
:data:`TICKET_TTL_S` seconds valid, naming the user, the credential it was issued on (so a revocation can name it)
and exactly what the socket may watch. The notifier holds only the public key: it can check tickets, never mint
them.

A socket stays authorised for :data:`SOCKET_RECHECK_S` after its ticket was issued; before that the client sends a
fresh ticket (``{"op": "renew", "ticket": ...}``), which the API only issues while the credential is valid and which
must still cover every subscription the socket holds. Otherwise the notifier closes the socket with
:data:`CLOSE_UNAUTHORIZED`, and the client reconnects with a new ticket and its cursors.

Example:
    >>> private, public = generate_keypair()
    >>> t = issue(Ticket(sub="u1", key="kiln_ab12cd34", projects=["vision"], jobs={"j-1": "vision"}), private)
    >>> verify(t, public).jobs
    {'j-1': 'vision'}
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import subjects

TICKET_TTL_S = 60
"""Longest life of a ticket: it only has to reach the notifier's handshake."""
SOCKET_RECHECK_S = 300
"""A socket must present a fresh ticket this often (at most five minutes after the last one was issued)."""
CLOSE_UNAUTHORIZED = 4401
"""WebSocket close code: no valid ticket (missing, expired, revoked, wrong scope); get a new one and resume."""
SUBPROTOCOL = "kiln.v1"
"""The subprotocol the notifier accepts; a ticket may ride beside it as ``kiln.ticket.<jwt>``."""
TICKET_SUBPROTOCOL_PREFIX = "kiln.ticket."
AUDIENCE = "kiln-notifier"
ISSUER = "kiln-api"
ALGORITHM = "EdDSA"
LEEWAY_S = 5


class TicketError(ValueError):
    """A ticket that is malformed, badly signed, expired or not meant for the notifier (message fit for a client)."""


class Ticket(BaseModel):
    """What a WebSocket may watch, signed by the API."""

    model_config = ConfigDict(extra="ignore")

    sub: str = Field(..., description="User id.")
    key: str = Field(..., description="Credential the ticket was issued on: an API key prefix or a session id.")
    projects: list[str] = Field(default_factory=list, description="Projects whose events the socket may watch.")
    jobs: dict[str, str] = Field(default_factory=dict, description="Jobs the socket may watch: job id -> project.")
    iat: int = Field(0, description="Issued at (Unix seconds); set by issue().")
    exp: int = Field(0, description="Expires at (Unix seconds); set by issue().")
    jti: str = Field(default_factory=lambda: uuid.uuid4().hex, description="Unique ticket id.")

    @field_validator("projects")
    @classmethod
    def _project_tokens(cls, value: list[str]) -> list[str]:
        for p in value:
            subjects.token(p)
        return value

    @field_validator("jobs")
    @classmethod
    def _job_tokens(cls, value: dict[str, str]) -> dict[str, str]:
        for job, project in value.items():
            subjects.token(job)
            subjects.token(project)
        return value

    def covers_job(self, job_id: str) -> str | None:
        """The project of ``job_id`` if this ticket lets the socket watch it, else None."""
        return self.jobs.get(job_id)

    def covers_project(self, project: str) -> bool:
        return project in self.projects


def generate_keypair() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as (private PEM, public PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def public_key_of(private_pem: bytes) -> bytes:
    """The public PEM that checks tickets signed with ``private_pem``."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(private_pem, password=None)
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def issue(ticket: Ticket, private_pem: bytes, *, ttl_s: int = TICKET_TTL_S, now: float | None = None) -> str:
    """Sign ``ticket``, valid for ``ttl_s`` seconds (at most :data:`TICKET_TTL_S`) from ``now``."""
    import jwt

    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = ticket.model_dump() | {
        "iat": issued, "exp": issued + min(ttl_s, TICKET_TTL_S), "aud": AUDIENCE, "iss": ISSUER}
    return jwt.encode(claims, private_pem, algorithm=ALGORITHM)


def verify(token: str, public_pem: bytes, *, now: float | None = None) -> Ticket:
    """Check signature, audience, issuer and expiry of ``token`` and return its ticket.

    Raises:
        TicketError: with a reason fit to send to the client (never the token itself).
    """
    import jwt

    if not isinstance(token, str) or not token or len(token) > 16_384:
        raise TicketError("no ticket, or not a ticket")
    options = {"require": ["exp", "iat", "sub", "aud", "iss"]}
    try:
        if now is not None:  # a fixed clock (tests): check the times ourselves against it
            claims = jwt.decode(token, public_pem, algorithms=[ALGORITHM], audience=AUDIENCE, issuer=ISSUER,
                                options=options | {"verify_exp": False, "verify_iat": False})
            if claims["exp"] + LEEWAY_S < now:
                raise jwt.ExpiredSignatureError
        else:
            claims = jwt.decode(token, public_pem, algorithms=[ALGORITHM], audience=AUDIENCE, issuer=ISSUER,
                                options=options, leeway=LEEWAY_S)
    except jwt.ExpiredSignatureError:
        raise TicketError("ticket expired; ask the API for a new one") from None
    except jwt.InvalidSignatureError:
        raise TicketError("ticket signature is not valid") from None
    except jwt.InvalidTokenError as exc:
        raise TicketError(f"ticket is not valid: {type(exc).__name__}") from None
    if claims["exp"] - claims["iat"] > TICKET_TTL_S:
        raise TicketError(f"ticket lives longer than {TICKET_TTL_S} s")
    try:
        return Ticket.model_validate(claims)
    except ValueError:
        raise TicketError("ticket scope is malformed") from None
