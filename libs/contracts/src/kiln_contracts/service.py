"""What every Kiln service process does the same way: dead-lettering poison messages, running until signalled."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from . import subjects

log = logging.getLogger("kiln.dlq")


def is_loopback(host: str) -> bool:
    """Whether a service told to listen on ``host`` is reachable from this machine only.

    Example:
        >>> [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "kiln.example")]
        [True, True, True, False, False]
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

REASON_HEADER = "Kiln-Reason"
STREAM_SEQ_HEADER = "Kiln-Stream-Seq"
SUBJECT_HEADER = "Kiln-Subject"


async def dead_letter(nc: NATS, consumer: str, msg: Msg, reason: str, *, terminate: bool = True) -> None:
    """Record a poison message on ``kiln.dlq.<consumer>`` (with its stream sequence and the reason), then terminate
    it so JetStream never redelivers it."""
    seq = msg.metadata.sequence.stream if msg.reply else 0
    headers = {REASON_HEADER: reason[:500], STREAM_SEQ_HEADER: str(seq), SUBJECT_HEADER: msg.subject}
    await nc.jetstream().publish(subjects.dlq(consumer), msg.data, headers=headers)
    if terminate and msg.reply:
        await msg.term()
    log.warning("%s dead-lettered stream seq %s on %s: %s", consumer, seq, msg.subject, reason)


def run_until_signalled(run: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Configure logging and run ``run(stop)``; SIGTERM or SIGINT sets ``stop`` for a graceful shutdown."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(stop)

    asyncio.run(_main())
