"""JetStream streams, durable consumers and KV buckets, and one function that creates or updates them."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, NotFoundError

from . import subjects

log = logging.getLogger(__name__)

DAY = 24 * 3600.0

JOBS = api.StreamConfig(
    name="KILN_JOBS",
    description="Start commands; a work queue: each message goes to one runner of its pool.",
    subjects=[subjects.START_ALL],
    retention=api.RetentionPolicy.WORK_QUEUE,
    storage=api.StorageType.FILE,
    duplicate_window=3600.0,
    max_age=7 * DAY,
)
EVENTS = api.StreamConfig(
    name="KILN_EVENTS",
    description="Job events: status, epochs, metrics, progress, artifacts, heartbeats, finished.",
    subjects=[subjects.EVENTS_ALL],
    retention=api.RetentionPolicy.LIMITS,
    storage=api.StorageType.FILE,
    duplicate_window=600.0,
    max_age=14 * DAY,
)
LOGS = api.StreamConfig(
    name="KILN_LOGS",
    description="Job log line batches; kept apart so that logs never slow metrics.",
    subjects=[subjects.LOGS_ALL],
    retention=api.RetentionPolicy.LIMITS,
    storage=api.StorageType.FILE,
    duplicate_window=600.0,
    max_age=3 * DAY,
)
DLQ = api.StreamConfig(
    name="KILN_DLQ",
    description="Poison messages with the consumer, stream sequence and reason.",
    subjects=[subjects.DLQ_ALL],
    retention=api.RetentionPolicy.LIMITS,
    storage=api.StorageType.FILE,
    max_age=30 * DAY,
)
AUDIT = api.StreamConfig(
    name="KILN_AUDIT",
    description="Audit records: who created, started, cancelled, re-ran jobs and changed keys, members, projects.",
    subjects=[subjects.AUDIT_ALL],
    retention=api.RetentionPolicy.LIMITS,
    storage=api.StorageType.FILE,
    duplicate_window=3600.0,
    max_age=400 * DAY,
)
STREAMS = (JOBS, EVENTS, LOGS, DLQ, AUDIT)

CLAIMS_BUCKET = "kiln_claims"
"""KV bucket: key ``<job_id>.<attempt>`` created atomically by the runner that claims the attempt;
``<job_id>.cancel`` set by the API when a job is cancelled (read before the claim, and by the runner holding the
job after a reconnect and every few seconds)."""
RUNNING_BUCKET = "kiln_running"
"""KV bucket: key ``<job_id>.<attempt>`` -> the running attempt (runner, StartJob, pid, and the stored resumable
checkpoint: uri, sha256, epoch), rewritten at every heartbeat with compare-and-set and deleted when the attempt
ends.  The reaper treats a key whose revision stops moving as lost, and deletes it before it acts (fencing)."""
LEASES_BUCKET = "kiln_leases"
"""KV bucket: leader leases (key ``reaper``), taken and renewed with compare-and-set."""
CLEARML_TASKS_BUCKET = "kiln_clearml_tasks"
"""KV bucket of the ClearML forwarder: job id -> ClearML task id."""
BUCKETS = ((CLAIMS_BUCKET, 30 * DAY), (RUNNING_BUCKET, 0.0), (LEASES_BUCKET, 0.0))


def cancel_key(job_id: str) -> str:
    """Key of a job's cancel mark in :data:`CLAIMS_BUCKET` (its value: why it was cancelled); ``*``: every job's.

    >>> cancel_key("j-1"), cancel_key("*")
    ('j-1.cancel', '*.cancel')
    """
    return f"{job_id if job_id == '*' else subjects.token(job_id)}.cancel"


def runner_consumer(pool: str, max_ack_pending: int = 1, ack_wait: float = 60.0) -> api.ConsumerConfig:
    """Durable pull consumer shared by every runner of ``pool``."""
    name = f"runner-{subjects.token(pool)}"
    return api.ConsumerConfig(
        durable_name=name,
        name=name,
        description=f"Runners of pool {pool}",
        filter_subject=subjects.start(pool),
        ack_policy=api.AckPolicy.EXPLICIT,
        deliver_policy=api.DeliverPolicy.ALL,
        ack_wait=ack_wait,
        max_deliver=20,
        max_ack_pending=max_ack_pending,
    )


@dataclass(frozen=True)
class Durable:
    stream: str
    config: api.ConsumerConfig


def event_and_log_consumers(name: str, *, ack_wait: float, max_ack_pending: int) -> tuple[Durable, Durable]:
    """A pair of durable pull consumers, ``<name>-events`` on KILN_EVENTS and ``<name>-logs`` on KILN_LOGS."""

    def cfg(durable: str, subject: str) -> api.ConsumerConfig:
        return api.ConsumerConfig(
            durable_name=durable, name=durable, filter_subject=subject,
            ack_policy=api.AckPolicy.EXPLICIT, deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=ack_wait, max_deliver=50, max_ack_pending=max_ack_pending,
        )

    return (
        Durable(EVENTS.name or "", cfg(f"{name}-events", subjects.EVENTS_ALL)),
        Durable(LOGS.name or "", cfg(f"{name}-logs", subjects.LOGS_ALL)),
    )


def writer_consumers(name: str = "metrics-writer") -> tuple[Durable, Durable]:
    """Durable pull consumers of the metrics-writer: one on events, one on logs.

    The ack wait is short so that what a killed writer held goes to another writer (or its restart) within 5 s;
    while a live writer holds messages longer (a slow commit, a database outage) it keeps them with in-progress
    acks.  A writer applies this config to an existing durable at start (``add_consumer`` updates it in place).
    """
    return event_and_log_consumers(name, ack_wait=5.0, max_ack_pending=20_000)


def forwarder_consumers(name: str = "clearml-forwarder") -> tuple[Durable, Durable]:
    """Durable pull consumers of the ClearML forwarder: one on events, one on logs.

    Unlike the writer's, these are held for a while: the forwarder keeps a job's messages (with in-progress acks)
    while ClearML is slow or down, so fewer may be pending; JetStream keeps the rest until it catches up.
    """
    return event_and_log_consumers(name, ack_wait=60.0, max_ack_pending=2_000)


async def ensure_streams(js: JetStreamContext, replicas: int | None = None) -> None:
    """Create every Kiln stream and KV bucket, or update the streams to this definition.

    ``replicas``: copies of each stream and bucket in a JetStream cluster.  None keeps what an existing stream has
    (an operator's replicated streams are never reset to one copy) and creates new ones with one.
    """
    for cfg in STREAMS:
        try:
            info = await js.stream_info(cfg.name or "")
        except NotFoundError:
            await js.add_stream(cfg.evolve(num_replicas=replicas or 1))
            log.info("created stream %s (%d replicas)", cfg.name, replicas or 1)
            continue
        try:
            await js.update_stream(cfg.evolve(num_replicas=replicas or info.config.num_replicas or 1))
        except BadRequestError as exc:  # e.g. retention cannot change: keep the existing one, say so
            log.warning("stream %s not updated: %s", cfg.name, exc)
    for bucket, ttl in BUCKETS:
        try:
            await js.key_value(bucket)
        except NotFoundError:  # nats-py raises BucketNotFoundError, a NotFoundError
            await js.create_key_value(bucket=bucket, history=1, ttl=ttl or None, replicas=replicas or 1)


async def ensure_consumer(js: JetStreamContext, stream: str, config: api.ConsumerConfig) -> None:
    """Create a durable consumer or update it to ``config``."""
    await js.add_consumer(stream, config)
