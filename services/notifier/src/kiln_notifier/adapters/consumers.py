"""Ordered consumers created through the named form of the consumer-create API, so that permissions can pin them.

nats-py creates an ephemeral consumer (``js.subscribe(ordered_consumer=True)``, and again each time an ordered
consumer recreates itself after a gap) with ``$JS.API.CONSUMER.CREATE.<stream>``: the consumer's name travels in
the request body only, so a right to send that request is a right to create *or rewrite any consumer* of the stream
(docs/nats-auth.md, "Known gap").  With a name in the config nats-py uses
``$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`` instead, and the server refuses a body whose name or filter
differs from the subject's: a permission can then allow the filters the notifier reads and deny the service
durables by name.  Each creation gets a fresh name (a recreated ordered consumer restarts at another sequence,
which an existing consumer cannot be updated to); the server still removes each one after its inactive threshold.

Example:
    >>> consumer_name("notifier").startswith("notifier-"), len(consumer_name("notifier"))
    (True, 41)
"""

from __future__ import annotations

import uuid
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, JetStreamManager, api


def consumer_name(owner: str) -> str:
    """A new consumer name of ``owner`` (one subject token: letters, digits and ``-``)."""
    return f"{owner}-{uuid.uuid4().hex}"


class _Named:
    owner = "notifier"

    async def add_consumer(self, stream: str, config: api.ConsumerConfig | None = None,
                           timeout: float | None = None, **params: Any) -> api.ConsumerInfo:
        if config is not None and not config.name and not config.durable_name and config.deliver_subject:
            # A copy: nats-py keeps the unnamed config to recreate the consumer, which then gets a new name again.
            config = config.evolve(name=consumer_name(self.owner))
        return await super().add_consumer(stream, config, timeout, **params)  # type: ignore[misc,no-any-return]


class _NamedManager(_Named, JetStreamManager):
    pass


class NamedConsumers(_Named, JetStreamContext):
    """A JetStream context whose ephemeral push consumers are created by name (``<owner>-<random>``)."""

    def __init__(self, nc: NATS, owner: str = "notifier", **options: Any) -> None:
        super().__init__(nc, **options)
        self.owner = owner

    @property
    def _jsm(self) -> JetStreamManager:  # what subscribe() and the ordered consumers' recreation call
        manager = _NamedManager(conn=self._nc, prefix=self._prefix, timeout=self._timeout)
        manager.owner = self.owner
        return manager
