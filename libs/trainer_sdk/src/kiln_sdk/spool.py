"""The local spool: events that could not be published yet, as JSON lines, replayed in order later.

Layout of a spool folder::

    events.jsonl     one kiln_contracts.Event JSON document per line, in publish order
    events.offset    byte offset up to which lines are acknowledged by JetStream (absent: 0)
    rejected.jsonl   lines JetStream refused for good (e.g. too large) or that do not parse: kept, never dropped

Replays are idempotent: each line is published with ``Nats-Msg-Id`` = its event id, so the stream stores it once
even when an earlier attempt was stored but its ack got lost.  The offset file makes a long replay resumable
beyond the stream's duplicate window.

Example (runner side, after the trainer exited)::

    import asyncio
    from kiln_sdk.spool import replay
    sent = asyncio.run(replay(job_dir / "spool", "nats://127.0.0.1:4222"))
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from kiln_contracts import Event
from kiln_contracts.natsauth.client import NatsTls, servers
from nats.errors import MaxPayloadError
from nats.js import JetStreamContext
from nats.js.errors import APIError, ServiceUnavailableError

_log = logging.getLogger("kiln.sdk.spool")
Message = tuple[str, bytes, str]
"""``(subject, payload, msg_id)``."""


class Spool:
    """Append-only JSON-lines spool with an acknowledged-prefix offset (single writer: one thread)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / "events.jsonl"
        self.offset_path = self.folder / "events.offset"
        self.rejected_path = self.folder / "rejected.jsonl"
        self._fh = None
        self.size = self.path.stat().st_size if self.path.exists() else 0
        self.offset = self._read_offset()

    def _read_offset(self) -> int:
        try:
            return min(int(self.offset_path.read_text().strip() or 0), self.size)
        except (OSError, ValueError):
            return 0

    @property
    def pending(self) -> bool:
        """Whether lines wait to be published."""
        return self.size > self.offset

    def append(self, payloads: Sequence[bytes]) -> None:
        """Append events (already serialized) and hand them to the OS (survives a killed process)."""
        if not payloads:
            return
        if self._fh is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "ab")  # noqa: SIM115 - kept open while spooling
        data = b"".join(p + b"\n" for p in payloads)
        self._fh.write(data)
        self._fh.flush()
        self.size += len(data)

    def read(self, max_lines: int) -> list[tuple[bytes, int]]:
        """Up to ``max_lines`` unacknowledged lines, each with the offset just after it."""
        out: list[tuple[bytes, int]] = []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            pos = self.offset
            while len(out) < max_lines and pos < self.size:
                line = fh.readline()
                if not line:
                    break
                pos += len(line)
                if not line.endswith(b"\n"):  # a torn last line (killed mid-write): stop before it
                    break
                out.append((line.rstrip(b"\n"), pos))
        return out

    def commit(self, offset: int) -> None:
        """Mark everything up to ``offset`` acknowledged; delete the spool once all of it is."""
        self.offset = offset
        if self.offset >= self.size:
            self.clear()
            return
        tmp = self.offset_path.with_suffix(".tmp")
        tmp.write_text(str(offset))
        os.replace(tmp, self.offset_path)

    def reject_torn_tail(self) -> None:
        """Move a last line without its newline (the writer was killed mid-write) to ``rejected.jsonl``.

        Only for a spool whose writer is gone (the runner's replay): a live writer may still be appending.
        """
        if not self.path.exists() or self.size == 0:
            return
        with open(self.path, "rb+") as fh:
            fh.seek(self.size - 1)
            if fh.read(1) == b"\n":
                return
            fh.seek(0)
            data = fh.read()  # rare path (a killed writer): reading the spool once is fine
            cut = data.rfind(b"\n") + 1
            self.reject(data[cut:])
            fh.truncate(cut)
        self.size = cut
        self.offset = min(self.offset, cut)

    def reject(self, line: bytes) -> None:
        """Keep a line JetStream will never accept, so nothing is lost silently."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.rejected_path, "ab") as fh:
            fh.write(line + b"\n")

    def clear(self) -> None:
        """Delete the spool files (all lines acknowledged)."""
        self.close()
        for p in (self.path, self.offset_path):
            p.unlink(missing_ok=True)
        self.size = self.offset = 0

    def close(self) -> None:
        if self._fh is not None:
            try:
                self._fh.flush()
                os.fsync(self._fh.fileno())
            finally:
                self._fh.close()
                self._fh = None


Owner = tuple[str, str]  # (project, job_id) a spool's events must belong to


def message_of(line: bytes, owner: Owner | None = None) -> Message:
    """Subject, payload and msg id of one spooled event line (raises on a line that is not an Event, or, with
    ``owner``, on an event of another job: a runner replays a trainer's spool with its own, wider rights, so a
    trainer must not be able to smuggle anything but its own job's events through it)."""
    ev = Event.model_validate_json(line)
    if owner is not None and (ev.project, ev.job_id) != owner:
        raise ValueError(f"event {ev.id} of job {ev.job_id} (project {ev.project}) in the spool of job {owner[1]} "
                         f"(project {owner[0]}): refused")
    return ev.subject, line, ev.id


def permanent(exc: BaseException) -> bool:
    """Whether a publish failed for a reason a retry will not fix (message too large, refused by the stream)."""
    if isinstance(exc, MaxPayloadError):
        return True
    return isinstance(exc, APIError) and not isinstance(exc, ServiceUnavailableError) \
        and exc.code is not None and 400 <= exc.code < 500 and exc.code != 408


class PendingBatch:
    """Messages published pipelined whose acks may still be on their way (see :func:`start_batch`)."""

    __slots__ = ("messages", "futures", "errors", "t0")

    def __init__(self, messages: Sequence[Message], futures: list[asyncio.Future | None],
                 errors: list[BaseException | None]) -> None:
        self.messages, self.futures, self.errors = messages, futures, errors
        self.t0 = asyncio.get_running_loop().time()

    async def settle(self, timeout: float) -> list[BaseException | None]:
        """Wait up to ``timeout`` s (from the publish) for the acks; one entry per message, ``None`` = acked."""
        pending = [f for f in self.futures if f is not None and not f.done()]
        if pending:
            left = max(self.t0 + timeout - asyncio.get_running_loop().time(), 0.01)
            _, not_done = await asyncio.wait(pending, timeout=left)
            for f in not_done:
                f.cancel()  # frees nats-py's in-flight slot; a late ack is simply ignored
        for i, f in enumerate(self.futures):
            if f is None:
                continue
            if f.cancelled():
                self.errors[i] = TimeoutError("no JetStream ack in time")
            elif f.exception() is not None:
                self.errors[i] = f.exception()
        return self.errors

    def cancel(self) -> None:
        for f in self.futures:
            if f is not None:
                f.cancel()


async def start_batch(js: JetStreamContext, messages: Sequence[Message]) -> PendingBatch:
    """Publish ``messages`` pipelined (``Nats-Msg-Id`` = id) without waiting for their acks."""
    futures: list[asyncio.Future | None] = []
    errors: list[BaseException | None] = []
    for subject, payload, msg_id in messages:
        try:
            futures.append(await js.publish_async(subject, payload, headers={"Nats-Msg-Id": msg_id}))
            errors.append(None)
        except Exception as exc:  # noqa: BLE001 - e.g. connection closed: the rest fail the same way
            futures.append(None)
            errors.append(exc)
    return PendingBatch(messages, futures, errors)


async def publish_batch(js: JetStreamContext, messages: Sequence[Message], timeout: float) -> list[BaseException | None]:
    """Publish ``messages`` pipelined (many in flight) and wait up to ``timeout`` s for all acks.

    Returns:
        One entry per message: ``None`` when JetStream acknowledged it, else the error (``TimeoutError`` when
        no ack came in time).
    """
    return await (await start_batch(js, messages)).settle(timeout)


async def drain_spool(
    js: JetStreamContext, spool: Spool, timeout: float = 5.0, chunk: int = 1000, max_chunks: int | None = None,
    owner: Owner | None = None,
) -> tuple[int, bool]:
    """Publish the spool's pending lines in order, committing after each acknowledged chunk.

    Lines JetStream refuses for good (see :func:`permanent`) or that do not parse go to ``rejected.jsonl``.

    Args:
        js: JetStream context to publish with.
        spool: The spool to drain.
        timeout: Seconds to wait for the acks of one chunk.
        chunk: Lines per chunk (all in flight at once).
        max_chunks: Stop after this many chunks (lets a caller interleave other work); ``None``: no limit.
        owner: ``(project, job_id)``: lines of any other job are rejected, not published (see :func:`message_of`).

    Returns:
        ``(published, failed)``: lines acknowledged, and whether a publish failed (the failed line and every
        line after it stay spooled, so the order is kept).
    """
    published = chunks = 0
    while spool.pending and (max_chunks is None or chunks < max_chunks):
        chunks += 1
        lines = spool.read(chunk)
        if not lines:
            return published, True  # only a torn line is left: it can never be published
        messages: list[Message | None] = []
        for line, _ in lines:
            try:
                messages.append(message_of(line, owner))
            except Exception as exc:  # noqa: BLE001 - unparseable or another job's: keep it aside and go on
                if owner is not None and isinstance(exc, ValueError) and "refused" in str(exc):
                    _log.warning("spool %s: %s", spool.folder, exc)
                messages.append(None)
        errors = iter(await publish_batch(js, [m for m in messages if m is not None], timeout))
        ok_to = spool.offset
        for (line, end), msg in zip(lines, messages):
            err: BaseException | None = next(errors) if msg is not None else ValueError("not an event")
            if err is not None and msg is not None and not permanent(err):
                spool.commit(ok_to)
                return published, True
            if err is None:
                published += 1
            else:
                spool.reject(line)
            ok_to = end
        spool.commit(ok_to)
    return published, False


def spool_folders(spool_dir: str | os.PathLike[str]) -> list[Path]:
    """``spool_dir`` and the spools of DDP workers inside it (``rank<N>-<pid>/``) that hold events."""
    root = Path(spool_dir)
    subs = sorted(p for p in root.glob("rank*-*") if (p / "events.jsonl").exists()) if root.is_dir() else []
    return [root, *subs]


def auth_options(user_credentials: str | os.PathLike[str] | None, inbox_prefix: str | None) -> dict[str, str]:
    """``nats.connect`` keywords of an identity: its creds file and inbox prefix, only those set (none: as before).

    Example:
        >>> auth_options("/job/nats.creds", "_INBOX.UABC"), auth_options(None, None)
        ({'user_credentials': '/job/nats.creds', 'inbox_prefix': '_INBOX.UABC'}, {})
    """
    options = {}
    if user_credentials:
        options["user_credentials"] = os.fspath(user_credentials)
    if inbox_prefix:
        options["inbox_prefix"] = inbox_prefix
    return options


async def replay(spool_dir: str | os.PathLike[str], nats_url: str, timeout: float = 10.0, *,
                 user_credentials: str | os.PathLike[str] | None = None, inbox_prefix: str | None = None,
                 owner: Owner | None = None, tls: NatsTls | None = None) -> int:
    """Publish what a trainer left in its spool (e.g. it was killed while NATS was unreachable).

    Also replays the spools of DDP workers inside ``spool_dir`` (see :func:`spool_folders`).  Deletes a spool when
    every line was acknowledged; otherwise keeps what is left for a later call.

    Args:
        spool_dir: The trainer's ``KILN_SPOOL_DIR`` (default ``$KILN_JOB_DIR/spool``).
        nats_url: NATS server to publish to.
        timeout: Seconds to wait for the acks of each chunk (and to connect).
        user_credentials: NATS ``.creds`` file to connect with (e.g. the runner's own); ``None``: none.
        inbox_prefix: The inbox prefix those credentials allow.
        owner: ``(project, job_id)`` of the spool's job: other jobs' lines are rejected (give it whenever the
            credentials reach wider than that job's own).
        tls: NATS TLS files (CA, client certificate) to connect with.

    Returns:
        Number of lines JetStream acknowledged (a line already stored is acknowledged and stored once).

    Raises:
        Exception: NATS is unreachable, or a line was not acknowledged (what is left stays for a later call).

    Example:
        >>> import asyncio, tempfile
        >>> asyncio.run(replay(tempfile.mkdtemp(), "nats://127.0.0.1:1"))  # nothing spooled: no connection needed
        0
    """
    import nats

    spools = [Spool(p) for p in spool_folders(spool_dir)]
    for s in spools:
        s.reject_torn_tail()  # the trainer is gone: a half-written last line can never be completed
    pending = [s for s in spools if s.pending]
    for s in spools:
        if not s.pending:
            s.clear()
    if not pending:
        return 0
    async def quiet(exc: Exception) -> None:  # nats-py would log every refused attempt with a traceback
        pass

    # nats-py keeps retrying a refused first connection whatever max_reconnect_attempts says: bound it here.
    context = tls.context() if tls is not None else None
    nc = await asyncio.wait_for(nats.connect(servers(nats_url), connect_timeout=timeout, allow_reconnect=False,
                                             max_reconnect_attempts=0, error_cb=quiet,
                                             **auth_options(user_credentials, inbox_prefix),
                                             **({"tls": context} if context is not None else {})), timeout)
    published = 0
    failed = False
    try:
        js = nc.jetstream(timeout=timeout)
        for spool in pending:
            try:
                n, bad = await drain_spool(js, spool, timeout=timeout, owner=owner)
                published += n
                failed |= bad
            finally:
                spool.close()
        if failed:
            raise RuntimeError(f"spool {spool_dir} not fully replayed ({published} events published); kept")
        return published
    finally:
        await nc.close()
