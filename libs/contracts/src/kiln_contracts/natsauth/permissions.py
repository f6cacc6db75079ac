"""What each Kiln identity may publish and subscribe to, generated from the contracts (subjects, streams, durables).

Nothing here spells a Kiln subject: every right is composed from :mod:`kiln_contracts.subjects` (builders, wildcard
constants and address templates) and :mod:`kiln_contracts.streams` (stream names, durables, buckets), with the
NATS-side subjects from :mod:`.jsapi`.  Service identities carry their lists in their user JWT; the trainer and the
third-party reader get theirs from a scoped signing key's template, filled in by the server from the user's tags.

Every identity has its own inbox prefix and no right on anyone else's: nobody reads another's replies or acks.

``python -m kiln_contracts.natsauth.permissions`` prints the table of docs/nats-auth.md.

Example:
    >>> r = api()
    >>> subjects.start("gpu") in r.pub_allow or "kiln.cmd.start.*" in r.pub_allow
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .. import streams, subjects
from . import jsapi

JOBS, EVENTS, LOGS = streams.JOBS.name or "", streams.EVENTS.name or "", streams.LOGS.name or ""
AUDIT, DLQ = streams.AUDIT.name or "", streams.DLQ.name or ""
# The forwarder's job -> task map.  streams.py does not export it yet (the forwarder's settings hold the default);
# with least privilege it must be provisioned like the other buckets.
CLEARML_TASKS_BUCKET = streams.CLEARML_TASKS_BUCKET

TAG_PROJECT, TAG_JOB, TAG_CONSUMER = "{{tag(project)}}", "{{tag(job)}}", "{{tag(consumer)}}"
USER_KEY = "{{subject()}}"  # the connecting user's public key
THIRD_PARTY_PREFIX = "tp"


@dataclass(frozen=True)
class Role:
    """One identity's rights.  ``inbox`` is the ``inbox_prefix`` it must connect with; ``streams`` the streams it
    checks at start (``STREAM.INFO``): with least privilege only the provisioner creates them."""

    name: str
    purpose: str
    pub_allow: list[str]
    sub_allow: list[str]
    pub_deny: list[str] = field(default_factory=list)
    inbox: str = ""
    streams: tuple[str, ...] = ()


@dataclass(frozen=True)
class Scope:
    """A scoped signing key's template: users it signs get these rights, ``{{...}}`` filled in per user."""

    role: str
    purpose: str
    pub_allow: list[str]
    sub_allow: list[str]
    tags: tuple[str, ...]
    subs: int
    payload: int
    conn_types: tuple[str, ...]


def pattern(builder: Callable[..., str], *values: str) -> str:
    """A subject pattern from a contracts builder, each argument replaced by ``values`` (``*``, ``>``, a template).

    The builders validate their tokens, so they are called with placeholder tokens that are swapped afterwards:
    the subject's shape stays defined once, in :mod:`kiln_contracts.subjects`.

    Example:
        >>> pattern(subjects.log, "p1", "*")
        'kiln.log.p1.*'
        >>> pattern(subjects.job_events, TAG_JOB, TAG_PROJECT)
        'kiln.evt.{{tag(project)}}.{{tag(job)}}.>'
    """
    marks = [f"__kiln_{i}__" for i in range(len(values))]
    out = builder(*marks)
    for mark, value in zip(marks, values, strict=True):
        out = out.replace(mark, value)
    return out


def third_party_durable(project: str, consumer: str) -> str:
    """The durable name of a third-party reader: ``tp-<project>-<consumer>`` (one subject token)."""
    return f"{THIRD_PARTY_PREFIX}-{project}-{consumer}"


def _own(name: str, owner: str | None = None) -> tuple[str, list[str]]:
    prefix = jsapi.inbox_prefix(owner or name)
    return prefix, [jsapi.inbox_sub(prefix)]


def provisioner() -> Role:
    inbox, sub = _own("provisioner")
    return Role("provisioner", "`kiln up` / deploy step: creates streams, KV buckets and every durable; not a service",
                jsapi.admin(), sub, inbox=inbox)


def _service_durables() -> list[tuple[str, str]]:
    return [(d.stream, d.config.durable_name or "") for d in (*streams.writer_consumers(),
                                                              *streams.forwarder_consumers())]


def api() -> Role:
    inbox, sub = _own("api")
    pub = [pattern(subjects.start, "*"), subjects.CANCEL_ALL, pattern(subjects.event, "*", "*", "*"),
           pattern(subjects.audit, "*", "*"),
           *jsapi.kv(streams.CLAIMS_BUCKET, write=streams.cancel_key("*"), read=False),  # cancel marks, never a claim
           *(jsapi.stream_info(s) for s in (JOBS, EVENTS, AUDIT)),
           # third-party durables (POST .../event-credentials): created with a project filter, deleted on revoke
           f"{jsapi.API}.CONSUMER.CREATE.{EVENTS}.*.{pattern(subjects.project_events, '*')}",
           f"{jsapi.API}.CONSUMER.CREATE.{LOGS}.*.{pattern(subjects.log, '*', '*')}",
           f"{jsapi.API}.CONSUMER.DELETE.{EVENTS}.*", f"{jsapi.API}.CONSUMER.DELETE.{LOGS}.*"]
    deny = [f"{jsapi.API}.CONSUMER.{op}.{s}.{d}{tail}" for s, d in _service_durables()
            for op, tail in (("CREATE", ".>"), ("DELETE", ""))]
    return Role("api", "start and cancel commands, the API's own events, audit records, cancel marks, "
                "third-party durables", pub, sub, deny, inbox=inbox, streams=(JOBS, EVENTS, AUDIT))


def runner(pool: str) -> Role:
    durable = streams.runner_consumer(pool)
    name = durable.durable_name or ""
    inbox, sub = _own(name)
    buckets = [*jsapi.kv(streams.CLAIMS_BUCKET), *jsapi.kv(streams.RUNNING_BUCKET, watch=True),
               *jsapi.kv(streams.LEASES_BUCKET)]
    pub = [*jsapi.durable_pull(JOBS, name, durable.filter_subject),
           pattern(subjects.start, "*"),  # the reaper re-queues lost attempts of every pool
           pattern(subjects.event, "*", "*", "*"), pattern(subjects.log, "*", "*"), subjects.dlq(name), *buckets,
           *(jsapi.stream_info(s) for s in (JOBS, EVENTS, LOGS))]
    return Role(name, f"runners of pool {pool}: its work queue, events and logs (its own and replayed trainer "
                "spools), claims, running registry, reaper lease, cancels", pub, [subjects.CANCEL_ALL, *sub],
                inbox=inbox, streams=(JOBS, EVENTS, LOGS))


def _pull_service(role: str, durables: tuple[streams.Durable, ...], purpose: str,
                  extra: list[str] | None = None) -> Role:
    inbox, sub = _own(role)
    pub: list[str] = []
    for d in durables:
        name = d.config.durable_name or ""
        pub += [*jsapi.durable_pull(d.stream, name, d.config.filter_subject), subjects.dlq(name)]
    seen = tuple(dict.fromkeys(d.stream for d in durables))
    pub += [*(jsapi.stream_info(s) for s in seen), *(extra or [])]
    return Role(role, purpose, pub, sub, inbox=inbox, streams=seen)


def metrics_writer(durable: str = "metrics-writer") -> Role:
    return _pull_service(durable, streams.writer_consumers(durable),
                         "its durables on events and logs (create with the pinned filter, fetch, ack), dead letters")


def clearml_forwarder(durable: str = "clearml-forwarder", task_bucket: str = CLEARML_TASKS_BUCKET) -> Role:
    return _pull_service(durable, streams.forwarder_consumers(durable),
                         "its durables on events and logs, dead letters, its job -> task map",
                         jsapi.kv(task_bucket))


def notifier() -> Role:
    """Ordered consumers created by name (``kiln_notifier.adapters.consumers``) through the named form with the
    filters it reads; the service durables denied by name, so it can neither re-filter nor delete them."""
    inbox, sub = _own("notifier")
    pub: list[str] = []
    for s, reads in ((EVENTS, subjects.EVENTS_ALL), (LOGS, pattern(subjects.log, "*", "*"))):
        pub += [jsapi.stream_info(s), *jsapi.msg_get(s), *jsapi.named_consumers(s, reads, delete=True)]
    deny = [f"{jsapi.API}.CONSUMER.{op}.{s}.{d}{tail}" for s, d in _service_durables()
            for op, tail in (("CREATE", ".>"), ("DELETE", ""))]
    return Role("notifier", "ordered consumers on events and logs for the WebSocket clients, each created under a "
                "name of its own (deleted when the last client leaves), last sequence per subject", pub, sub, deny,
                inbox=inbox, streams=(EVENTS, LOGS))


def service_roles(pools: tuple[str, ...] = ("default",)) -> list[Role]:
    """Every identity with rights in its own user JWT: the provisioner, the services, one runner role per pool."""
    return [provisioner(), api(), *(runner(p) for p in pools), metrics_writer(), clearml_forwarder(), notifier()]


TRAINER = Scope(
    "trainer", "one attempt of one job: its own events and log batches, acks in its own inbox; minted by its runner",
    [pattern(subjects.job_events, TAG_JOB, TAG_PROJECT), pattern(subjects.log, TAG_PROJECT, TAG_JOB)],
    [jsapi.inbox_sub(jsapi.inbox_prefix(USER_KEY))], ("project", "job"),
    subs=16, payload=1024 * 1024, conn_types=("STANDARD",))
_TP = third_party_durable(TAG_PROJECT, TAG_CONSUMER)
THIRD_PARTY = Scope(
    "third-party", "read one project's events and logs through durables Kiln made for it (filter pinned), nothing "
    "else; minted by the API", [*jsapi.durable_pull(EVENTS, _TP), *jsapi.durable_pull(LOGS, _TP)],
    [jsapi.inbox_sub(jsapi.inbox_prefix(USER_KEY))], ("project", "consumer"),
    subs=32, payload=64 * 1024, conn_types=("STANDARD", "WEBSOCKET"))
SCOPES = (TRAINER, THIRD_PARTY)


def _cell(items: list[str] | tuple[str, ...]) -> str:
    return "<br>".join(f"`{i}`" for i in items) or "—"


def markdown_table(pools: tuple[str, ...] = ("default",)) -> str:
    """The permission table of docs/nats-auth.md."""
    rows = ["| identity | what for | inbox prefix | publish | publish denied | subscribe |",
            "|---|---|---|---|---|---|"]
    for r in service_roles(pools):
        rows.append(f"| {r.name} | {r.purpose} | `{r.inbox}` | {_cell(r.pub_allow)} | {_cell(r.pub_deny)} "
                    f"| {_cell(r.sub_allow)} |")
    for s in SCOPES:
        inbox = jsapi.inbox_prefix(USER_KEY)
        rows.append(f"| {s.role} (scoped key; tags {', '.join(s.tags)}) | {s.purpose} | `{inbox}` "
                    f"| {_cell(s.pub_allow)} | — | {_cell(s.sub_allow)} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    print(markdown_table(), end="")


if __name__ == "__main__":
    main()
