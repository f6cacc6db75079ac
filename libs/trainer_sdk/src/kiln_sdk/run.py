"""The run: what a training script holds to report, and ``init()`` that builds it from the environment."""

from __future__ import annotations

import atexit
import hashlib
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from ._events import warn_once
from .context import JobContext
from .nats_reporter import NatsReporter
from .reporters import FileReporter, NullReporter, Reporter


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
        self._submit("metrics", {"step": step, "metrics": dict(metrics)})

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

    def artifact(self, path: str | os.PathLike[str], name: str | None = None, epoch: int | None = None) -> None:
        """Announce a file (``ArtifactStored`` with its size and SHA-256; ``uri`` is its absolute path for now).

        The hash is computed here, on the calling thread, because the file may be overwritten right after
        (``last.pt`` is, every epoch): about 1 s per GB.
        """
        try:
            p = Path(path).resolve()
            with open(p, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
            size = p.stat().st_size
        except Exception as exc:  # noqa: BLE001
            warn_once(f"artifact:{path}", f"artifact {path} not reported: {exc!r}")
            return
        self._submit("artifact", {"name": name or p.name, "uri": str(p), "size": size, "sha256": digest,
                                  "epoch": epoch})

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
        """Wait up to ``timeout`` s until everything reported so far is delivered; True when it is."""
        try:
            return self.reporter.flush(timeout)
        except Exception as exc:  # noqa: BLE001
            warn_once("flush", f"flush failed: {exc!r}")
            return False

    def finish(self, status: str = "completed", timeout: float | None = None) -> bool:
        """Deliver what is queued (waiting at most ``timeout`` s, default ``$KILN_SDK_FLUSH_TIMEOUT`` or 10) and
        close the reporter.  Undelivered events stay in the spool for the runner.  Idempotent.

        Returns:
            True when every event was acknowledged.
        """
        if self.finished:
            return True
        self.status = status
        if os.getpid() != self._pid:  # a forked child (e.g. a data loader worker) owns nothing to flush
            return True
        try:
            return self.reporter.close(_env_float("KILN_SDK_FLUSH_TIMEOUT", 10.0) if timeout is None else timeout)
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
        _install_hooks()
        return _current


def _default_reporter(ctx: JobContext) -> Reporter:
    try:
        if ctx.in_kiln:
            return NatsReporter(ctx.nats_url, ctx.job_id or "", ctx.project, ctx.attempt, ctx.spool_dir)
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
