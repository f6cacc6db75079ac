"""Kiln reporting for Ultralytics YOLO training, in the style of ``ultralytics/utils/callbacks/*``.

Reports, from rank 0 only: model size at setup, throttled in-epoch progress (at most ~4/s), one
``EpochCompleted`` per epoch with every train loss, learning rate, validation metric, fitness and the epoch time,
the checkpoints as artifacts, and the final validation of ``best.pt`` as ``final/*`` metrics.  Honours
cancellation: when ``$KILN_JOB_DIR/cancel`` appears (or :meth:`kiln_sdk.Run.request_cancel` is called) it sets
``trainer.stop`` at the next batch or epoch end; Ultralytics then validates, saves and returns, and the run is
marked :attr:`kiln_sdk.Run.cancelled` (the Kiln trainer exits with code 3).

Example:
    >>> from ultralytics import YOLO                                # doctest: +SKIP
    >>> from kiln_sdk.integrations.ultralytics import add_kiln_callbacks
    >>> model = add_kiln_callbacks(YOLO("yolov8n.yaml"))             # doctest: +SKIP
    >>> model.train(data="coco8.yaml", epochs=3)                     # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
import time
import weakref
from pathlib import Path
from typing import Any

from .. import current, init
from .._events import warn_once
from ..run import Run
from . import _resume

PROGRESS_INTERVAL_S = 0.25
"""Minimum seconds between two progress events (and two checks of the cancel file)."""

CHECKPOINT_INTERVAL_ENV = "KILN_CHECKPOINT_INTERVAL_S"
"""Minimum seconds between two stores of the same checkpoint file while training (default 60; 0: every save),
counted from the start of training for the rolling ``last.pt``/``best.pt``.  A snapshot (``epoch10.pt``, never
rewritten) is stored at once, and the final ``last.pt``/``best.pt`` always are."""


_SNAPSHOT = re.compile(r"epoch\d+\.pt")
"""Ultralytics' ``save_period`` checkpoints: each is written once, so it is stored when it appears."""


def _checkpoint_interval() -> float:
    try:
        return max(0.0, float(os.environ.get(CHECKPOINT_INTERVAL_ENV) or 60.0))
    except ValueError:
        warn_once("checkpoint-interval", f"{CHECKPOINT_INTERVAL_ENV} is not a number: using 60")
        return 60.0


class _State:
    """What the callbacks remember about one trainer."""

    def __init__(self) -> None:
        self.epoch_started = -1  # trainer.epoch seen by on_train_epoch_start
        self.last_epoch = 0  # last 1-based epoch reported
        self.batch = 0
        self.epoch_t0 = self.started = time.monotonic()
        self.last_check = 0.0
        self.files: dict[Path, tuple[int, int]] = {}  # checkpoint -> (mtime_ns, size) last announced
        self.announced_at: dict[Path, float] = {}  # checkpoint -> monotonic time it was last announced
        self.written: dict[Path, tuple[tuple[int, int], int | None]] = {}  # checkpoint -> (key, epoch that saved it)
        self.stop_logged = False
        self.kiln_stop = False  # Kiln (cancel, hand-back) asked the trainer to stop
        self.resume_at = self.started  # when the last resumable copy was stored (the first waits one interval)
        self.resume_epoch = 0
        self.resume_copies = _resume.Copies()


_states: "weakref.WeakKeyDictionary[Any, _State]" = weakref.WeakKeyDictionary()


def _state(trainer: Any) -> _State:
    st = _states.get(trainer)
    if st is None:
        st = _states[trainer] = _State()
    return st


def _is_rank0() -> bool:
    return all(os.environ.get(k, "-1") in ("-1", "0") for k in ("RANK", "LOCAL_RANK"))


def _run() -> Run:
    return current() or init()


def _guard(fn: Any) -> Any:
    """Rank 0 only, and an SDK bug never becomes a training failure."""

    def hook(trainer: Any) -> None:
        if not _is_rank0():
            return
        try:
            fn(trainer)
        except Exception as exc:  # noqa: BLE001
            warn_once(f"ultralytics:{fn.__name__}", f"{fn.__name__} failed: {exc!r}")

    hook.__name__ = hook.__qualname__ = fn.__name__
    hook.__doc__ = fn.__doc__
    return hook


def _check_cancel(trainer: Any, st: _State, where: str) -> None:
    if _run().should_stop():
        trainer.stop = True
        st.kiln_stop = True
        if not st.stop_logged:
            st.stop_logged = True
            _run().log(f"cancel requested: stopping after this {where}, then saving")


def _announce_checkpoints(trainer: Any, epoch: int | None, final: bool = False) -> None:
    """Store and announce the checkpoints that changed since they were last announced.

    While training, one file is stored at most every :data:`CHECKPOINT_INTERVAL_ENV` seconds, the first time one
    interval after training started: with short epochs, hashing and uploading ``last.pt`` and ``best.pt`` (with
    the optimizer state, several times the model's size) after every epoch would compete with training for CPU,
    disk and network.  Snapshots (``epochN.pt``) are stored when they appear; ``final`` (the end of training,
    cancelled or not) stores every changed file.
    """
    wdir = Path(getattr(trainer, "wdir", "") or "")
    if not wdir.is_dir():
        return
    st = _state(trainer)
    now = time.monotonic()
    interval = 0.0 if final else _checkpoint_interval()
    for path in sorted(wdir.glob("*.pt")):
        if _resume.is_resume_file(path):
            continue  # stored by _store_resume
        stat = path.stat()
        key = (stat.st_mtime_ns, stat.st_size)
        if not final and st.written.get(path, (None, None))[0] != key:
            st.written[path] = (key, epoch)  # the epoch a file belongs to is the one whose save wrote it
        if st.files.get(path) == key:
            continue  # unchanged since it was last announced
        last = st.announced_at.get(path)
        if last is None and not _SNAPSHOT.fullmatch(path.name):
            last = st.started  # a rolling checkpoint: its first store also waits one interval
        if last is not None and now - last < interval:
            continue  # stored again at a later save, or at the end
        st.files[path] = key
        st.announced_at[path] = now
        # At the end Ultralytics rewrites last.pt and best.pt without the optimizer: same weights, same epoch.
        _run().artifact(path, name=path.name, epoch=st.written.get(path, (None, epoch))[1])


def _store_resume(trainer: Any, st: _State, epoch: int, *, now: bool = False) -> None:
    """Copy the full-state ``last.pt`` of ``epoch`` and store it for the next attempt (see :mod:`._resume`).

    While training at most once per checkpoint interval; ``now`` when Kiln asked the trainer to stop.
    """
    last = Path(getattr(trainer, "last", "") or "")
    if epoch <= st.resume_epoch or epoch >= trainer.epochs or not last.is_file():
        return  # nothing newer, or the last epoch: there is nothing left to resume after it
    t = time.monotonic()
    if not now and t - st.resume_at < _checkpoint_interval():
        return
    copy = _resume.snapshot(last, epoch)
    st.resume_at, st.resume_epoch = t, epoch
    run = _run()
    job_dir = run.context.job_dir.resolve()
    stale = [p.name for p in st.resume_copies.add(copy, t)]
    run.artifact(copy, name=copy.name, epoch=epoch, on_stored=lambda p: _resume.write_record(job_dir, p),
                 prune=tuple(stale))


@_guard
def on_pretrain_routine_end(trainer: Any) -> None:
    """Model size (parameters; GFLOPs from Ultralytics' cheap stride-sized profile) as a log line and metrics."""
    model = trainer.model
    params = sum(p.numel() for p in model.parameters())
    metrics: dict[str, float] = {"model/parameters": float(params)}
    try:
        from ultralytics.utils.torch_utils import get_flops

        metrics["model/gflops"] = float(get_flops(model, trainer.args.imgsz))
    except Exception:  # noqa: BLE001 - optional
        pass
    run = _run()
    run.log_metrics(0, metrics)
    gflops = f", {metrics['model/gflops']:.3g} GFLOPs at imgsz {trainer.args.imgsz}" if "model/gflops" in metrics else ""
    run.log(f"model {getattr(trainer.args, 'model', '?')}: {params:,} parameters{gflops}, task {trainer.args.task}")


@_guard
def on_train_start(trainer: Any) -> None:
    """One log line with the shape of the run."""
    _run().log(
        f"training {trainer.epochs} epochs x {len(trainer.train_loader)} batches of {trainer.batch_size} "
        f"on {trainer.device}, start epoch {trainer.start_epoch + 1}"
    )


@_guard
def on_train_epoch_start(trainer: Any) -> None:
    """Remember which epoch really started (the final validation re-fires on_fit_epoch_end without one)."""
    st = _state(trainer)
    st.epoch_started = trainer.epoch
    st.batch = 0
    st.epoch_t0 = st.last_check = time.monotonic()


@_guard
def on_train_batch_end(trainer: Any) -> None:
    """Throttled ``Progress`` and cancel check (at most every ``PROGRESS_INTERVAL_S``, plus the last batch)."""
    st = _state(trainer)
    st.batch += 1
    now = time.monotonic()
    nb = len(trainer.train_loader)
    if now - st.last_check < PROGRESS_INTERVAL_S and st.batch < nb:
        return
    st.last_check = now
    # The cancel check (a stat of the cancel file) comes first: a system call lets another thread take the
    # interpreter lock, and right after ``progress`` that is the publisher it has just woken, which would hold the
    # training thread here for its whole turn instead of running beside the next batch's torch operations.
    _check_cancel(trainer, st, "batch")
    elapsed = max(now - st.epoch_t0, 1e-9)
    per_batch = elapsed / st.batch
    remaining = max(nb - st.batch, 0) + max(trainer.epochs - trainer.epoch - 1, 0) * nb
    _run().progress(trainer.epoch + 1, trainer.epochs, st.batch, nb,
                    images_per_s=st.batch * trainer.batch_size / elapsed, eta_s=remaining * per_batch)


@_guard
def on_model_save(trainer: Any) -> None:
    """Announce ``last.pt``, ``best.pt`` (and ``epochN.pt``) when they changed (throttled, see
    :data:`CHECKPOINT_INTERVAL_ENV`)."""
    _announce_checkpoints(trainer, trainer.epoch + 1)
    _store_resume(trainer, _state(trainer), trainer.epoch + 1)


@_guard
def on_fit_epoch_end(trainer: Any) -> None:
    """``EpochCompleted`` once per epoch; the final validation of best.pt becomes ``final/*`` metrics."""
    st = _state(trainer)
    run = _run()
    if trainer.epoch != st.epoch_started or trainer.epoch + 1 <= st.last_epoch:
        # Ultralytics' final_eval raises trainer.epoch by one and fires this hook again: not a new epoch.
        final = {f"final/{k}": v for k, v in (trainer.metrics or {}).items()}
        if final:
            run.log_metrics(st.last_epoch, final)
        return
    metrics: dict[str, Any] = {}
    if trainer.tloss is not None:
        metrics.update(trainer.label_loss_items(trainer.tloss, prefix="train"))
    metrics.update(getattr(trainer, "lr", None) or {})
    metrics.update(trainer.metrics or {})
    if trainer.fitness is not None:
        metrics["fitness"] = trainer.fitness
    st.last_epoch = trainer.epoch + 1
    _check_cancel(trainer, st, "epoch")  # before the event, as in on_train_batch_end
    run.epoch(st.last_epoch, trainer.epochs, metrics, trainer.epoch_time)
    if st.kiln_stop:  # the last save before Ultralytics strips last.pt: the next attempt resumes from it
        _store_resume(trainer, st, st.last_epoch, now=True)


@_guard
def on_train_end(trainer: Any) -> None:
    """Announce the final (optimizer-stripped) checkpoints and say how training ended."""
    st = _state(trainer)
    _announce_checkpoints(trainer, st.last_epoch or None, final=True)
    how = "cancelled" if _run().cancelled else "finished"
    _run().log(f"training {how} after {st.last_epoch} epochs; best fitness {trainer.best_fitness}")


callbacks = {
    "on_pretrain_routine_end": on_pretrain_routine_end,
    "on_train_start": on_train_start,
    "on_train_epoch_start": on_train_epoch_start,
    "on_train_batch_end": on_train_batch_end,
    "on_model_save": on_model_save,
    "on_fit_epoch_end": on_fit_epoch_end,
    "on_train_end": on_train_end,
}
"""Hook name -> function, as Ultralytics' own integrations export them."""


def add_kiln_callbacks(model_or_trainer: Any) -> Any:
    """Register :data:`callbacks` on a ``YOLO`` model or a trainer (anything with ``add_callback``).

    Idempotent: a hook already registered (e.g. by :mod:`kiln_sdk.integrations.ultralytics_autoload`) is not
    added twice.

    Returns:
        The same object, for chaining.
    """
    registered = getattr(model_or_trainer, "callbacks", None)
    for event, fn in callbacks.items():
        if isinstance(registered, dict) and fn in registered.get(event, ()):
            continue
        model_or_trainer.add_callback(event, fn)
    return model_or_trainer
