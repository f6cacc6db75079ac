"""The run: what a training script holds to report, and ``init()`` that builds it from the environment."""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from types import FrameType, TracebackType
from typing import Any

from ._events import warn_once
from .artifacts import ArtifactWorker, store_from_context
from .context import JobContext
from .nats_reporter import NatsReporter
from .reporters import FileReporter, NullReporter, Reporter
from .system import SystemMonitor, should_monitor


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


class Run:
    """A training run's reporting handle; every method is cheap, thread-safe enough and never raises.

    Build it with :func:`kiln_sdk.init`.  Used as a context manager it finishes the run on exit ("failed" when the
    block raised, "cancelled" when a cancel request was honoured).

    Example:
        >>> from kiln_sdk import RecordingReporter, init
        >>> with init(reporter=RecordingReporter(job_id="j1")) as run:
        ...     run.log_metrics(1, {"loss": 0.5})
        ...     run.epoch(1, 10, {"train/box_loss": 1.2}, epoch_time=3.0)
        >>> [e.data.kind for e in run.reporter.events], run.status
        (['metrics', 'epoch'], 'completed')
    """

    def __init__(self, context: JobContext, reporter: Reporter) -> None:
        self.context = context
        self.reporter = reporter
        self.status: str | None = None
        self.cancelled = False
        self._cancel_flag = False
        self._pid = os.getpid()
        self._put = reporter.submit  # bound once: log_metrics is the hot path of the training thread
        self._artifacts: ArtifactWorker | None = None
        self._artifacts_lock = threading.Lock()
        self.monitor: SystemMonitor | None = None

    @property
    def job_id(self) -> str | None:
        return self.context.job_id

    @property
    def finished(self) -> bool:
        """Whether :meth:`finish` ran (later calls are ignored)."""
        return self.status is not None

    def _submit(self, kind: str, fields: dict[str, Any]) -> None:
        try:
            self.reporter.submit((kind, time.time(), fields))
        except Exception as exc:  # noqa: BLE001 - reporting must never break training
            warn_once(f"submit:{kind}", f"could not report {kind}: {exc!r}")

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Report free-form metrics (``MetricsLogged``); values may be floats, ints, tensors or numpy scalars.

        Example:
            >>> run.log_metrics(100, {"loss": 0.31, "lr": 1e-3})  # doctest: +SKIP
        """
        try:
            self._put(("metrics", time.time(), {"step": step, "metrics": dict(metrics)}))
        except Exception as exc:  # noqa: BLE001 - reporting must never break training
            warn_once("submit:metrics", f"could not report metrics: {exc!r}")

    def log(self, message: str) -> None:
        """Report one log line (``LogBatch``, stream ``sdk``); consecutive lines are batched together."""
        self._submit("log", {"text": message})

    def progress(self, epoch: int, epochs: int, batch: int, batches: int,
                 images_per_s: float | None = None, eta_s: float | None = None) -> None:
        """Report in-epoch progress (``Progress``; ``epoch`` 1-based).  Callers throttle it (a few per second)."""
        self._submit("progress", {"epoch": epoch, "epochs": epochs, "batch": batch, "batches": batches,
                                  "images_per_s": images_per_s, "eta_s": eta_s})

    def epoch(self, epoch: int, epochs: int, metrics: Mapping[str, Any], epoch_time: float | None = None) -> None:
        """Report a finished epoch (``EpochCompleted``; ``epoch`` 1-based) with all its metrics.

        Example:
            >>> run.epoch(1, 10, {"train/box_loss": 1.2, "metrics/mAP50(B)": 0.1}, epoch_time=12.5)  # doctest: +SKIP
        """
        self._submit("epoch", {"epoch": epoch, "epochs": epochs, "metrics": dict(metrics), "epoch_time": epoch_time})

    def artifact(self, path: str | os.PathLike[str], name: str | None = None, epoch: int | None = None,
                 on_stored: Callable[[dict[str, Any]], None] | None = None, prune: tuple[str, ...] = ()) -> None:
        """Store and announce a file (``ArtifactStored``: name, ``uri`` where it is stored, size, SHA-256, epoch).

        Returns at once: a background thread hashes the file, copies or uploads it to the configured store
        (see :mod:`kiln_sdk.artifacts`) and then reports it.  A file rewritten before its turn is stored once, in
        its newest version.  :meth:`flush` and :meth:`finish` wait for the queued artifacts.  ``on_stored`` is
        called (on that thread) with the announced fields once the store holds the file; ``prune`` names earlier
        artifacts of this attempt that it replaces, deleted from the store after that.

        Example:
            >>> run.artifact("runs/train/weights/last.pt", epoch=3)  # doctest: +SKIP
        """
        try:
            if self._artifacts is None:
                with self._artifacts_lock:
                    if self._artifacts is None:
                        self._artifacts = ArtifactWorker(store_from_context(self.context), self._submit_at)
            self._artifacts.add(path, name, epoch, on_stored, prune)
        except Exception as exc:  # noqa: BLE001
            warn_once(f"artifact:{path}", f"artifact {path} not reported: {exc!r}")

    def _submit_at(self, record: Any) -> None:
        """Submit a record made on another thread (artifacts, system metrics), time included."""
        try:
            self.reporter.submit(record)
        except Exception as exc:  # noqa: BLE001
            warn_once(f"submit:{record[0]}", f"could not report {record[0]}: {exc!r}")

    def start_system_metrics(self, interval: float) -> SystemMonitor | None:
        """Report CPU, RAM and GPU use every ``interval`` s from a background thread (see :mod:`kiln_sdk.system`).

        :func:`init` calls it inside Kiln (``KILN_SYSTEM_METRICS_S``, default 5 s); it is stopped by :meth:`finish`.
        """
        if self.monitor is None and interval > 0:
            self.monitor = SystemMonitor(self._submit_at, interval, _monitor_key(self.context)).start()
        return self.monitor

    @property
    def cancel_requested(self) -> bool:
        """Whether the job was asked to stop: :meth:`request_cancel`, or ``$KILN_JOB_DIR/cancel`` exists."""
        if self._cancel_flag:
            return True
        return self.context.in_kiln and self.context.cancel_file.exists()

    def request_cancel(self) -> None:
        """Ask the training loop to stop at its next check (what the runner's cancel file does)."""
        self._cancel_flag = True

    def should_stop(self) -> bool:
        """For training loops: True when cancellation was requested; also marks the run :attr:`cancelled`."""
        if self.cancel_requested:
            self.cancelled = True
        return self.cancelled

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait up to ``timeout`` s until everything reported so far (artifacts included) is delivered."""
        try:
            deadline = time.monotonic() + timeout
            ok = self._artifacts.wait(timeout) if self._artifacts is not None else True
            return self.reporter.flush(max(deadline - time.monotonic(), 0.0)) and ok
        except Exception as exc:  # noqa: BLE001
            warn_once("flush", f"flush failed: {exc!r}")
            return False

    def finish(self, status: str = "completed", timeout: float | None = None) -> bool:
        """Store the queued artifacts (at most ``$KILN_SDK_ARTIFACT_TIMEOUT`` s, default 300), deliver what is queued
        (at most ``$KILN_SDK_FLUSH_TIMEOUT`` s, default 10) and close the reporter; with ``timeout`` (e.g. on SIGTERM)
        both together take at most that long, half of it at least for the events.  Undelivered events stay in the
        spool for the runner.  Idempotent.

        Returns:
            True when every event was acknowledged.
        """
        if self.finished:
            return True
        self.status = status
        if os.getpid() != self._pid:  # a forked child (e.g. a data loader worker) owns nothing to flush
            return True
        try:
            if self.monitor is not None:
                self.monitor.stop()
            ok = True
            start = time.monotonic()
            if self._artifacts is not None:
                ok = self._artifacts.close(_env_float("KILN_SDK_ARTIFACT_TIMEOUT", 300.0) if timeout is None
                                           else timeout / 2)
            if timeout is None:
                flush = _env_float("KILN_SDK_FLUSH_TIMEOUT", 10.0)
            else:
                flush = max(timeout - (time.monotonic() - start), timeout / 2)
            return self.reporter.close(flush) and ok
        except Exception as exc:  # noqa: BLE001
            warn_once("finish", f"finish failed: {exc!r}")
            return False

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.cancelled or exc_type is KeyboardInterrupt:
            self.finish("cancelled")
        else:
            self.finish("failed" if exc_type is not None else "completed")


_current: Run | None = None
_lock = threading.Lock()
_hooks_installed = False


def current() -> Run | None:
    """The run of this process, if :func:`init` was called and it is not finished."""
    run = _current
    return run if run is not None and not run.finished else None


def init(*, reporter: Reporter | None = None, env: Mapping[str, str] | None = None) -> Run:
    """Start (or return the already running) run of this process.

    Inside Kiln (``KILN_JOB_ID`` set) events go to JetStream through a :class:`NatsReporter`; outside, to
    ``KILN_SDK_FILE`` as JSON lines when that is set, else nowhere.  Installs flushing at interpreter exit and on
    SIGTERM (main thread only, chaining any previous handler).

    Args:
        reporter: Use this reporter instead of choosing one from the environment (tests).
        env: Environment to read instead of ``os.environ``.

    Example:
        >>> import kiln_sdk
        >>> run = kiln_sdk.init(env={})          # outside Kiln: a no-op run
        >>> run.log_metrics(1, {"loss": 0.5})
        >>> run.finish()
        True
    """
    global _current
    with _lock:
        if _current is not None and not _current.finished:
            return _current
        ctx = JobContext.from_env(env)
        if reporter is None:
            reporter = _default_reporter(ctx)
        _current = Run(ctx, reporter)
        if ctx.in_kiln and ctx.system_metrics_s > 0 and _rank() in (-1, 0) and should_monitor(_monitor_key(ctx)):
            _current.start_system_metrics(ctx.system_metrics_s)
        _install_hooks()
        return _current


def _monitor_key(ctx: JobContext) -> str:
    return f"{ctx.job_id}:{ctx.attempt}"


def _rank() -> int:
    """This process's rank in a ``torch.distributed`` job (-1 when it is not a worker of one)."""
    try:
        return int(os.environ.get("RANK", "-1"))
    except ValueError:
        return -1


def _default_reporter(ctx: JobContext) -> Reporter:
    try:
        if ctx.in_kiln:
            spool = ctx.spool_dir
            if _rank() >= 0:  # a DDP worker: its own spool beside the launcher's (the runner replays both)
                spool = spool / f"rank{_rank()}-{os.getpid()}"
            return NatsReporter(ctx.nats_url, ctx.job_id or "", ctx.project, ctx.attempt, spool,
                                user_credentials=ctx.nats_creds, inbox_prefix=ctx.nats_inbox_prefix,
                                tls=ctx.nats_tls)
        if ctx.sdk_file is not None:
            return FileReporter(ctx.sdk_file)
    except Exception as exc:  # noqa: BLE001
        warn_once("reporter", f"reporting disabled: {exc!r}")
    return NullReporter()


def _install_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_at_exit)
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    try:
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, lambda signum, frame: _on_sigterm(signum, frame, previous))
    except (ValueError, OSError) as exc:
        warn_once("sigterm", f"no SIGTERM flush: {exc!r}")


def _at_exit() -> None:
    run = current()
    if run is not None:
        # The interpreter sets sys.last_value when an uncaught exception ended the main script.
        run.finish("failed" if getattr(sys, "last_value", None) is not None else "completed")


def _on_sigterm(signum: int, frame: FrameType | None, previous: Any) -> None:
    run = current()
    if run is not None:
        run.finish("terminated", timeout=_env_float("KILN_SDK_TERM_TIMEOUT", 5.0))
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        # Default behaviour: die by the signal (exit status 143 / -15) as if we had not been here.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
