"""Composition root: settings -> app -> one uvicorn server."""

from __future__ import annotations

import logging
import sys
from typing import Any

import uvicorn
from kiln_observability import setup_logging
from kiln_observability.logs import resolve_level
from pydantic import ValidationError

from .app import create_app
from .auth import redact
from .settings import NotifierSettings


class RedactTickets(logging.Filter):
    """Takes tickets out of log lines: uvicorn logs each handshake's URL, and a client may put one there."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        clean = redact(text)
        if clean != text:
            record.msg, record.args = clean, None
        return True


def build_server(settings: NotifierSettings) -> uvicorn.Server:
    """The uvicorn server for ``settings`` (also used by the tests and the benchmark).

    One worker: every client of the process shares one NATS connection and one event loop; scale out with
    more notifier processes behind a load balancer (clients resume on any of them with their cursor).
    The ``websockets-sansio`` protocol makes ``send`` wait while the socket's write buffer is full, which
    is what lets a slow client's queue fill up and be detected instead of growing the buffer without bound.
    """
    config = uvicorn.Config(
        create_app(settings), host=settings.host, port=settings.port, workers=1,
        ws="websockets-sansio", log_level=resolve_level(settings.log_level).lower(), lifespan="on",
        log_config=None,  # its lines go through the root logger: text or JSON, like every Kiln line
        # Compressing every message once per client cost ~6 % of the CPU with 1,000 clients; events are small.
        ws_per_message_deflate=False,
        # A client that stopped reading must not hold up a restart (its cursor lets it resume elsewhere).
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout_s)),
    )
    for name in ("uvicorn.error", "uvicorn.access"):  # set up by uvicorn.Config just above
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTickets) for f in logger.filters):
            logger.addFilter(RedactTickets())
    return uvicorn.Server(config)


def main() -> None:
    """Entry point of the ``kiln-notifier`` script."""
    try:
        settings = NotifierSettings()
    except ValidationError as exc:
        sys.exit(f"kiln-notifier: refusing to start: {'; '.join(_problem(e) for e in exc.errors())}")
    setup_logging("notifier", settings.log_level)
    build_server(settings).run()


def _problem(error: Any) -> str:
    """One settings error as the operator sees it: the variable to fix and why."""
    reason = str(error["msg"]).removeprefix("Value error, ")
    return f"KILN_NOTIFIER_{str(error['loc'][0]).upper()}: {reason}" if error["loc"] else reason


if __name__ == "__main__":
    main()
