"""What every Kiln service process does the same way: queueing a job attempt, dead-lettering poison messages,
running until signalled."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from . import subjects
from .commands import StartJob
from .events import Event, JobStatus, JobStatusChanged

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

def queued_event(cmd: StartJob, source: str, reason: str) -> Event:
    """The ``queued`` event of an attempt: one id per job and attempt, so publishing it twice stores it once.

    It is an event on its own (:meth:`Event.single`): whoever queues the attempt (the API, the runner handing it
    back, the reaper) never numbers it into a sequence of its own.

    Example:
        >>> from kiln_contracts import JobSpec
        >>> cmd = StartJob(job_id="j1", attempt=2, spec=JobSpec(model="yolov8n.yaml", dataset="/d"))
        >>> ev = queued_event(cmd, "reaper", "attempt 1 lost")
        >>> ev.id, ev.data.status.value, ev.seq, ev.prev, ev.publisher
        ('j1-2-queued', 'queued', 1, 0, 'j1-2-queued')
    """
    return Event.single(id=f"{cmd.job_id}-{cmd.attempt}-queued", time=cmd.issued_at, job_id=cmd.job_id,
                        project=cmd.spec.project, attempt=cmd.attempt, source=source,
                        data=JobStatusChanged(status=JobStatus.queued, reason=reason))


async def publish_attempt(js: JetStreamContext, cmd: StartJob, *, source: str, reason: str,
                          timeout: float = 5.0) -> None:
    """Queue an attempt: its start command on its pool's subject, then its ``queued`` event, each with a message id
    of its own (the command's ``msg_id``, the event's id), so a retry after a lost ack stores each once.  The one way
    the API (a new job, a re-run), a runner (handing an attempt back) and the reaper (a lost attempt) queue one."""
    await js.publish(cmd.subject, cmd.model_dump_json().encode(), headers={"Nats-Msg-Id": cmd.msg_id},
                     timeout=timeout)
    ev = queued_event(cmd, source, reason)
    await js.publish(ev.subject, ev.to_bytes(), headers=ev.headers(), timeout=timeout)


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
