"""Notifier tickets, pure logic (no server, no NATS): grants, renewals, where a ticket may ride, log redaction.

Unit tests by nature; they live beside the integration tests because the notifier owns only test_notifier*.py.
"""

from __future__ import annotations

import doctest
import logging

import pytest
from kiln_contracts.tickets import TicketError, generate_keypair
from kiln_notifier import auth, domain, settings
from kiln_notifier.auth import Grant, Tickets, Unauthorized, covers, offered_ticket, redact
from kiln_notifier.main import RedactTickets

from kiln_testing.notifier import PUBLIC_KEY, ticket

NOW = 1_750_000_000.0


def _tickets(recheck_s: float = 300) -> Tickets:
    return Tickets(PUBLIC_KEY, recheck_s)


@pytest.mark.parametrize("module", [auth, domain, settings])
def test_docstring_examples(module) -> None:
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_grant_lasts_recheck_s_from_the_tickets_issue_time() -> None:
    grant = _tickets(300).grant(ticket(jobs={"j-1": "vision"}, now=NOW - 20), now=NOW)
    assert grant.expires_at == int(NOW - 20) + 300 and grant.ticket.sub == "user-1"
    # Stamped in the future (a clock ahead within the leeway): no extra time.
    assert _tickets(300).grant(ticket(projects=["p"], now=NOW + 3), now=NOW).expires_at == NOW + 300


@pytest.mark.parametrize(("token", "reason"), [
    (ticket(projects=["p"], now=NOW - 120), "ticket expired; ask the API for a new one"),
    (ticket(projects=["p"], now=NOW, private_key=generate_keypair()[0]), "ticket signature is not valid"),
    ("", "no ticket, or not a ticket"),
])
def test_grant_refuses_bad_tickets(token: str, reason: str) -> None:
    with pytest.raises(Unauthorized) as refused:
        _tickets().grant(token, now=NOW)
    assert refused.value.reason == reason


def test_grant_refuses_a_ticket_older_than_the_recheck() -> None:
    with pytest.raises(Unauthorized, match="too old"):
        _tickets(recheck_s=10).grant(ticket(projects=["p"], now=NOW - 30), now=NOW)


def test_renewal_extends_and_takes_the_new_scope() -> None:
    tickets = _tickets(300)
    grant = tickets.grant(ticket(jobs={"j-1": "vision", "j-2": "vision"}, now=NOW), now=NOW)
    renewed = tickets.renew(grant, ticket(jobs={"j-1": "vision"}, now=NOW + 200), {"job:j-1": "vision"}, now=NOW + 200)
    assert renewed.expires_at == NOW + 500
    assert covers(renewed.ticket, "job:j-2") is None  # what comes next is judged by the new ticket


def test_renewal_refusals() -> None:
    tickets = _tickets(300)
    grant = tickets.grant(ticket(jobs={"j-1": "vision"}, projects=["vision"], now=NOW), now=NOW)
    held = {"job:j-1": "vision", "project:vision": "vision"}
    with pytest.raises(Unauthorized, match="another user"):
        tickets.renew(grant, ticket(jobs={"j-1": "vision"}, projects=["vision"], sub="user-2", now=NOW), held, now=NOW)
    with pytest.raises(Unauthorized, match="no longer covers project:vision: reconnect"):
        tickets.renew(grant, ticket(jobs={"j-1": "vision"}, now=NOW), held, now=NOW)
    with pytest.raises(Unauthorized, match="no longer covers job:j-1"):  # the same id, another project
        tickets.renew(grant, ticket(jobs={"j-1": "audio"}, projects=["vision"], now=NOW), held, now=NOW)
    # Answered, not fatal: an invalid ticket, or one older than the socket's.
    with pytest.raises(TicketError):
        tickets.renew(grant, ticket(jobs={"j-1": "vision"}, now=NOW - 120), held, now=NOW)
    with pytest.raises(ValueError, match="older than the one this socket holds"):
        tickets.renew(grant, ticket(jobs={"j-1": "vision"}, projects=["vision"], now=NOW - 10), held, now=NOW)


def test_renewal_never_shortens_the_deadline() -> None:
    tickets = _tickets(300)
    grant = Grant(tickets.grant(ticket(projects=["p"], now=NOW), now=NOW).ticket, NOW + 400)
    assert tickets.renew(grant, ticket(projects=["p"], now=NOW + 1), {}, now=NOW + 1).expires_at == NOW + 400


def test_ticket_rides_only_beside_kiln_v1() -> None:
    assert offered_ticket(["kiln.v1", "kiln.ticket.abc"]) == "abc"
    assert offered_ticket(["kiln.v1"]) is None
    assert offered_ticket([]) is None
    with pytest.raises(ValueError, match="offer the subprotocol kiln.v1 beside the ticket"):
        offered_ticket(["kiln.ticket.abc"])
    with pytest.raises(ValueError, match="more than one ticket"):
        offered_ticket(["kiln.v1", "kiln.ticket.a", "kiln.ticket.b"])


def test_log_lines_lose_their_tickets() -> None:
    token = ticket(projects=["p"])
    assert token not in redact(f"GET /api/v1/ws?after=1&ticket={token} 403")
    assert redact(f"offered kiln.ticket.{token}") == "offered kiln.ticket.[redacted]"
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, '%s - "WebSocket %s" 403',
                               ("127.0.0.1:5000", f"/api/v1/ws?ticket={token}"), None)
    assert RedactTickets().filter(record) and record.getMessage() == (
        '127.0.0.1:5000 - "WebSocket /api/v1/ws?ticket=[redacted]" 403')
