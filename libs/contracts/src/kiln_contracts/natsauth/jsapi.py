"""The NATS-side subjects a JetStream client sends to, as nats-py 2.16 sends them (no Kiln subject here).

Each function returns what one kind of use needs, so a role's list reads as what the role does.  The wire forms
were read off a traced nats-server; the ``$JS.ACK.*.*.<stream>...`` and ``$JS.FC.*.*.<stream>...`` twins are the
v2 ack/flow-control format behind the server's ``js_ack_fc_v2`` feature flag (off in 2.14/2.15, to become the
default), included now so that an upgrade does not cut every consumer off.

Example:
    >>> durable_pull("KILN_JOBS", "runner-gpu")[:2]
    ['$JS.API.CONSUMER.INFO.KILN_JOBS.runner-gpu', '$JS.API.CONSUMER.MSG.NEXT.KILN_JOBS.runner-gpu']
"""

from __future__ import annotations

API = "$JS.API"
INBOX = "_INBOX"  # nats-py's default inbox prefix; every Kiln identity replaces it with its own


def inbox_prefix(owner: str) -> str:
    """A private inbox prefix (``nats.connect(inbox_prefix=...)``): replies and acks come back under it."""
    return f"{INBOX}.{owner}"


def inbox_sub(prefix: str) -> str:
    """The subscribe right that a connection with ``inbox_prefix=prefix`` needs for its replies."""
    return f"{prefix}.>"


def stream_info(stream: str) -> str:
    """``js.stream_info``: read a stream's config and state (services check their streams exist with it)."""
    return f"{API}.STREAM.INFO.{stream}"


def msg_get(stream: str) -> list[str]:
    """``js.get_msg`` / ``get_last_msg``: the stored-message form, and the direct form (streams with allow_direct)."""
    return [f"{API}.STREAM.MSG.GET.{stream}", f"{API}.DIRECT.GET.{stream}", f"{API}.DIRECT.GET.{stream}.>"]


def acks(stream: str, consumer: str) -> list[str]:
    """Ack, nak, in-progress and term of messages delivered by ``consumer``."""
    return [f"$JS.ACK.{stream}.{consumer}.>", f"$JS.ACK.*.*.{stream}.{consumer}.>"]


def durable_pull(stream: str, consumer: str, pinned_filter: str | None = None) -> list[str]:
    """Bind to a durable pull consumer, fetch, ack; with ``pinned_filter`` also create or update it with exactly
    that filter (``$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>``: the server refuses a body whose filter
    differs, err_code 10131).  nats-py uses that form when the config has ``name`` and a filter other than ``>``."""
    rights = [f"{API}.CONSUMER.INFO.{stream}.{consumer}", f"{API}.CONSUMER.MSG.NEXT.{stream}.{consumer}",
              *acks(stream, consumer)]
    if pinned_filter:
        rights.append(f"{API}.CONSUMER.CREATE.{stream}.{consumer}.{pinned_filter}")
    return rights


def ordered_consumers(stream: str) -> list[str]:
    """Ephemeral ordered push consumers through the unnamed form ``$JS.API.CONSUMER.CREATE.<stream>`` (KV
    ``watch``/``keys``): the filter travels in the body only, so it cannot be pinned here; give it only on streams
    where no durable lives (the notifier creates its consumers by name: :func:`named_consumers`).  Also their info
    and flow control.
    """
    return [f"{API}.CONSUMER.CREATE.{stream}", f"{API}.CONSUMER.INFO.{stream}.*",
            f"$JS.FC.{stream}.>", f"$JS.FC.*.*.{stream}.>"]


def named_consumers(stream: str, filter_subject: str, *, delete: bool = False) -> list[str]:
    """Consumers created by a name of the caller's choosing through the named form
    ``$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>``: the server refuses a body whose name or filter differs
    from the subject's, so the filter is pinned here (``>`` in it allows any narrower one).  Also their info, flow
    control, and with ``delete`` deleting one by name (any consumer of the stream: deny the ones to keep).
    """
    rights = [f"{API}.CONSUMER.CREATE.{stream}.*.{filter_subject}", f"{API}.CONSUMER.INFO.{stream}.*",
              f"$JS.FC.{stream}.>", f"$JS.FC.*.*.{stream}.>"]
    if delete:
        rights.append(f"{API}.CONSUMER.DELETE.{stream}.*")
    return rights


def kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def kv_keys(bucket: str, key: str = ">") -> str:
    """The subject of ``key`` in ``bucket`` (a wildcard pattern allowed): put, create, update, delete publish here."""
    return f"$KV.{bucket}.{key}"


def kv(bucket: str, *, write: str | None = ">", read: bool = True, watch: bool = False) -> list[str]:
    """A KV bucket: open it (``js.key_value``); ``write`` the keys matching that pattern (None: none); ``read``
    (``get``, stored or direct form); ``watch`` (``watch``/``keys``: an ordered consumer on the bucket's stream)."""
    stream = kv_stream(bucket)
    rights = [stream_info(stream)]
    if write:
        rights.append(kv_keys(bucket, write))
    if read:
        rights += [f"{API}.STREAM.MSG.GET.{stream}", f"{API}.DIRECT.GET.{stream}",
                   f"{API}.DIRECT.GET.{stream}.{kv_keys(bucket)}"]
    if watch:
        rights += ordered_consumers(stream)
    return rights


def admin() -> list[str]:
    """Every JetStream API call: create, update and delete streams, KV buckets and consumers."""
    return [f"{API}.>"]
