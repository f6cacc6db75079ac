"""Who may watch what, and until when: the tickets of the notifier's sockets (no socket, no NATS here).

A socket is authorised by a ticket (see ``kiln_contracts.tickets``) sent in its handshake
(``Sec-WebSocket-Protocol: kiln.v1, kiln.ticket.<jwt>``) or as its first frame. It may then watch what the
ticket names, until ``expires_at`` = the ticket's issue time + ``recheck_s``; a renewal by the same user that
still covers every held subscription moves that deadline, anything else ends the socket with 4401.

Example:
    >>> from kiln_contracts.tickets import Ticket, generate_keypair, issue
    >>> private, public = generate_keypair()
    >>> tickets = Tickets(public, recheck_s=300)
    >>> token = issue(Ticket(sub="u1", key="k", jobs={"j-1": "vision"}), private, now=1_000)
    >>> grant = tickets.grant(token, now=1_010)
    >>> grant.expires_at, covers(grant.ticket, "job:j-1"), covers(grant.ticket, "job:j-2")
    (1300, 'vision', None)
    >>> tickets.renew(grant, issue(Ticket(sub="u1", key="k"), private, now=1_200), {"job:j-1": "vision"}, now=1_200)
    Traceback (most recent call last):
    ...
    kiln_notifier.auth.Unauthorized: the renewed ticket no longer covers job:j-1: reconnect with a new ticket
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kiln_contracts.tickets import (
    SUBPROTOCOL,
    TICKET_SUBPROTOCOL_PREFIX,
    Ticket,
    TicketError,
    verify,
)

FIRST_FRAME = '{"op": "auth", "ticket": "..."}'
HOW_TO_SEND = f"send it in the Sec-WebSocket-Protocol header ({TICKET_SUBPROTOCOL_PREFIX}<ticket>) or as the first frame"
TICKET_IN_URL = f"a ticket in the URL is refused (URLs end up in access logs): {HOW_TO_SEND}"


class Unauthorized(Exception):
    """The socket has no valid ticket for what it asks: answered with an ``error`` and a 4401 close."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def load_public_key(path: Path) -> bytes:
    """The API's Ed25519 public key (PEM) from ``path``.

    Raises:
        ValueError: unreadable, not PEM, or not an Ed25519 public key (the message says which).
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the ticket public key file {path}: {exc.strerror or exc}") from None
    try:
        key = load_pem_public_key(pem)
    except ValueError:
        raise ValueError(f"{path} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key (tickets are signed with EdDSA)")
    return pem


def offered_ticket(subprotocols: Sequence[str]) -> str | None:
    """The ticket among a handshake's offered subprotocols (``kiln.ticket.<jwt>``), ``None`` if there is none.

    Raises:
        ValueError: more than one ticket, or a ticket without ``kiln.v1`` beside it.

    Example:
        >>> offered_ticket(["kiln.v1", "kiln.ticket.abc"]), offered_ticket(["kiln.v1"])
        ('abc', None)
    """
    tickets = [p[len(TICKET_SUBPROTOCOL_PREFIX):] for p in subprotocols if p.startswith(TICKET_SUBPROTOCOL_PREFIX)]
    if len(tickets) > 1:
        raise ValueError("more than one ticket offered in Sec-WebSocket-Protocol")
    if tickets and SUBPROTOCOL not in subprotocols:
        raise ValueError(f"offer the subprotocol {SUBPROTOCOL} beside the ticket")
    return tickets[0] if tickets else None


def covers(ticket: Ticket, key: str) -> str | None:
    """The project whose subjects subscription ``key`` may read under ``ticket``; ``None``: not covered.

    Example:
        >>> t = Ticket(sub="u", key="k", projects=["vision"], jobs={"j-1": "vision"})
        >>> covers(t, "job:j-1"), covers(t, "project:vision"), covers(t, "project:audio")
        ('vision', 'vision', None)
    """
    kind, _, name = key.partition(":")
    if kind == "job":
        return ticket.covers_job(name)
    return name if kind == "project" and ticket.covers_project(name) else None


def not_covered(key: str) -> str:
    """The reason sent when a subscription is outside the ticket."""
    kind, _, name = key.partition(":")
    return f"{kind} {name} is not covered by this ticket: ask the API for a ticket that names it"


@dataclass(frozen=True)
class Grant:
    """What one socket may watch (its ticket) and until when (Unix seconds)."""

    ticket: Ticket
    expires_at: float


class Tickets:
    """Checks tickets with the API's public key and turns them into grants."""

    def __init__(self, public_pem: bytes, recheck_s: float) -> None:
        self.public_pem = public_pem
        self.recheck_s = recheck_s

    def _deadline(self, ticket: Ticket, now: float) -> float:
        # A ticket stamped in the future (clock skew within the leeway) earns no extra time.
        return min(ticket.iat, now) + self.recheck_s

    def grant(self, token: str, now: float | None = None) -> Grant:
        """The grant of a socket's first ticket.

        Raises:
            Unauthorized: malformed, badly signed, expired or not meant for the notifier.
        """
        try:
            ticket = verify(token, self.public_pem, now=now)  # now=None: the real clock, with every JWT time check
        except TicketError as exc:
            raise Unauthorized(str(exc)) from None
        now = time.time() if now is None else now
        grant = Grant(ticket, self._deadline(ticket, now))
        if grant.expires_at <= now:  # only with a recheck_s shorter than a ticket's life
            raise Unauthorized("ticket too old to open a socket; ask the API for a new one")
        return grant

    def renew(self, grant: Grant, token: str, held: Mapping[str, str], now: float | None = None) -> Grant:
        """The grant after a renewal; ``held`` maps each open subscription to the project it reads.

        Raises:
            TicketError: an invalid ticket (answered; the socket keeps its current deadline).
            ValueError: a ticket older than the one the socket holds (answered likewise).
            Unauthorized: another user, or a scope that drops a held subscription (the socket is closed).
        """
        ticket = verify(token, self.public_pem, now=now)
        now = time.time() if now is None else now
        if ticket.sub != grant.ticket.sub:
            raise Unauthorized("the renewed ticket is for another user: reconnect with your own ticket")
        if ticket.iat < grant.ticket.iat:
            raise ValueError("the renewed ticket is older than the one this socket holds")
        lost = [key for key, project in held.items() if covers(ticket, key) != project]
        if lost:
            raise Unauthorized(f"the renewed ticket no longer covers {', '.join(lost)}: reconnect with a new ticket")
        return Grant(ticket, max(grant.expires_at, self._deadline(ticket, now)))


def _seconds(value: float) -> float | int:
    return int(value) if float(value).is_integer() else round(value, 3)


def authorized_message(expires_at: float) -> str:
    """Sent once the socket's ticket is accepted: renew before ``expires_at`` (Unix seconds)."""
    return json.dumps({"type": "authorized", "expires_at": _seconds(expires_at)})


def renewed_message(expires_at: float) -> str:
    """Sent when a renewal is accepted, with the new deadline."""
    return json.dumps({"type": "renewed", "expires_at": _seconds(expires_at)})


_TICKET_IN_TEXT = re.compile(r"(ticket=|kiln\.ticket\.)[^&\s\"']+")


def redact(text: str) -> str:
    """``text`` without the tickets it may quote (a refused URL in a server log line).

    Example:
        >>> redact('"WebSocket /api/v1/ws?ticket=eyJhbGc.eyJzdWIi.sig&x=1" 403')
        '"WebSocket /api/v1/ws?ticket=[redacted]&x=1" 403'
    """
    return _TICKET_IN_TEXT.sub(r"\1[redacted]", text)
