"""What the provisioner creates, and what a service with least privilege does instead: check.

With least privilege no service may create or change a stream or a bucket: the provisioner identity does it at
``kiln up`` / deploy time (:func:`provision`), and each service checks at start that its streams exist
(:func:`missing_streams`, which needs only ``STREAM.INFO``).  Services still create or update their *own*
durables (their creds pin the durable's name and filter), so a config change in the contracts reaches them.
"""

from __future__ import annotations

from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from .. import streams, subjects
from .permissions import CLEARML_TASKS_BUCKET, EVENTS, LOGS, pattern, third_party_durable


def third_party_consumers(project: str, consumer: str, *, ack_wait: float = 60.0,
                          max_ack_pending: int = 1000) -> tuple[streams.Durable, streams.Durable]:
    """The durable pull consumers of one third-party reader: ``tp-<project>-<consumer>`` on the event and the log
    stream, each filtered to ``project``.  Its creds can fetch and ack from them, never change them."""
    name = third_party_durable(project, consumer)

    def cfg(subject: str) -> api.ConsumerConfig:
        return api.ConsumerConfig(name=name, durable_name=name, filter_subject=subject,
                                  ack_policy=api.AckPolicy.EXPLICIT, deliver_policy=api.DeliverPolicy.ALL,
                                  ack_wait=ack_wait, max_ack_pending=max_ack_pending,
                                  description=f"third-party reader {consumer} of project {project}")

    return (streams.Durable(EVENTS, cfg(subjects.project_events(project))),
            streams.Durable(LOGS, cfg(pattern(subjects.log, project, "*"))))


async def provision(js: JetStreamContext, pools: tuple[str, ...] = ("default",), *,
                    task_bucket: str = CLEARML_TASKS_BUCKET, replicas: int | None = None) -> None:
    """Create or update every stream, KV bucket and service durable (run with the provisioner's creds).

    ``replicas``: copies of each in a JetStream cluster (3 on a 3-node cluster); None keeps existing streams' count.
    """
    await streams.ensure_streams(js, replicas)
    try:
        await js.key_value(task_bucket)
    except NotFoundError:
        await js.create_key_value(bucket=task_bucket, history=1, replicas=replicas or 1)
    for pool in pools:
        await streams.ensure_consumer(js, streams.JOBS.name or "", streams.runner_consumer(pool))
    for d in (*streams.writer_consumers(), *streams.forwarder_consumers()):
        await streams.ensure_consumer(js, d.stream, d.config)


async def add_third_party(js: JetStreamContext, project: str, consumer: str) -> tuple[streams.Durable, ...]:
    """Create a third-party reader's durables (the API does this before it mints the creds)."""
    durables = third_party_consumers(project, consumer)
    for d in durables:
        await streams.ensure_consumer(js, d.stream, d.config)
    return durables


async def remove_third_party(js: JetStreamContext, project: str, consumer: str) -> None:
    """Delete a third-party reader's durables (after revoking its creds)."""
    for d in third_party_consumers(project, consumer):
        try:
            await js.delete_consumer(d.stream, d.config.durable_name or "")
        except NotFoundError:
            pass


async def missing_streams(js: JetStreamContext, names: tuple[str, ...]) -> list[str]:
    """The streams of ``names`` that do not exist (a service with least privilege checks, never creates)."""
    missing = []
    for name in names:
        try:
            await js.stream_info(name)
        except NotFoundError:
            missing.append(name)
    return missing
