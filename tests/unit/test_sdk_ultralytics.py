"""The Ultralytics callbacks driven in Ultralytics' own order (8.4.x) by a stand-in trainer, into a RecordingReporter."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import kiln_sdk
from kiln_sdk import RecordingReporter
from kiln_sdk.integrations import ultralytics as kiln_ul


class FakeTrainer:
    """The trainer attributes the callbacks read, with Ultralytics' semantics (0-based epoch, dict tloss...)."""

    def __init__(self, wdir: Path, epochs: int = 2, nb: int = 3) -> None:
        self.epoch, self.epochs, self.start_epoch = 0, epochs, 0
        self.train_loader = [None] * nb
        self.batch_size = 8
        self.wdir = wdir
        self.stop = False
        self.tloss = None
        self.metrics: dict[str, float] = {}
        self.lr: dict[str, float] = {}
        self.fitness = None
        self.best_fitness = None
        self.epoch_time = None
        self.device = "cpu"
        self.callbacks: dict[str, list] = {}

    def add_callback(self, event: str, fn) -> None:  # noqa: ANN001
        self.callbacks.setdefault(event, []).append(fn)

    def fire(self, event: str) -> None:
        for fn in self.callbacks.get(event, []):
            fn(self)

    def label_loss_items(self, loss_items, prefix="train"):  # noqa: ANN001
        return {f"{prefix}/{k}": round(float(v), 5) for k, v in loss_items.items()}

    def train(self, on_batch=None) -> None:  # noqa: ANN001
        self.fire("on_train_start")
        for epoch in range(self.epochs):
            self.epoch = epoch
            self.fire("on_train_epoch_start")
            for i in range(len(self.train_loader)):
                self.tloss = {"box_loss": 1.0 / (i + 1), "cls_loss": 2.0}
                self.fire("on_train_batch_end")
                if on_batch:
                    on_batch(epoch, i)
                if self.stop:
                    break
            self.lr = {"lr/pg0": 0.01, "lr/pg1": 0.02}
            self.metrics, self.fitness = {"metrics/mAP50(B)": 0.1 * (epoch + 1), "val/box_loss": 1.0}, 0.5
            (self.wdir / "last.pt").write_bytes(b"last%d" % epoch)
            if epoch == 0:
                (self.wdir / "best.pt").write_bytes(b"best")
            self.fire("on_model_save")
            self.epoch_time = 1.5
            self.stop |= epoch + 1 >= self.epochs
            self.fire("on_fit_epoch_end")
            if self.stop:
                break
        # final_eval: best.pt validated, epoch raised by one, on_fit_epoch_end fired again without val/* keys
        self.metrics = {"metrics/mAP50(B)": 0.3}
        self.epoch += 1
        self.fire("on_fit_epoch_end")
        self.epoch -= 1
        (self.wdir / "last.pt").write_bytes(b"stripped")
        self.fire("on_train_end")


@pytest.fixture()
def recorded(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(kiln_ul, "PROGRESS_INTERVAL_S", 0.0)  # every batch, to make the test deterministic
    rec = RecordingReporter(job_id="j1")
    run = kiln_sdk.init(reporter=rec, env={"KILN_JOB_ID": "j1", "KILN_JOB_DIR": str(tmp_path)})
    yield run, rec
    run.finish()


def test_one_epoch_event_per_epoch_and_no_phantom_final_one(tmp_path: Path, recorded) -> None:
    run, rec = recorded
    trainer = kiln_ul.add_kiln_callbacks(FakeTrainer(tmp_path, epochs=2, nb=3))
    trainer.train()
    assert run.flush(10)  # artifacts are hashed and announced by a background thread

    epochs = rec.of_kind("epoch")
    assert [(e.epoch, e.epochs, e.epoch_time) for e in epochs] == [(1, 2, 1.5), (2, 2, 1.5)]
    assert epochs[0].metrics == {"train/box_loss": 0.33333, "train/cls_loss": 2.0, "lr/pg0": 0.01,
                                 "lr/pg1": 0.02, "metrics/mAP50(B)": 0.1, "val/box_loss": 1.0, "fitness": 0.5}
    finals = rec.of_kind("metrics")
    assert [(m.step, m.metrics) for m in finals] == [(2, {"final/metrics/mAP50(B)": 0.3})]
    artifacts = rec.of_kind("artifact")
    assert [(a.name, a.epoch) for a in artifacts if a.name == "best.pt"] == [("best.pt", 1)]  # unchanged later
    last = [a for a in artifacts if a.name == "last.pt"]
    # Every save is announced unless a newer one superseded it before the worker read it; the final one always is.
    assert [a.epoch for a in last] == sorted(a.epoch for a in last) and last[-1].epoch == 2
    assert (last[-1].sha256, last[-1].size) == (hashlib.sha256(b"stripped").hexdigest(), 8)
    progress = rec.of_kind("progress")
    assert [(p.epoch, p.batch, p.batches) for p in progress] == [(e, b, 3) for e in (1, 2) for b in (1, 2, 3)]
    assert progress[-1].eta_s == 0.0 and not run.cancelled


def test_cancel_file_stops_training_at_the_next_batch(tmp_path: Path, recorded) -> None:
    run, rec = recorded

    def cancel_during_first_epoch(epoch: int, batch: int) -> None:
        if (epoch, batch) == (0, 0):
            (tmp_path / "cancel").touch()  # what the runner does

    trainer = kiln_ul.add_kiln_callbacks(FakeTrainer(tmp_path, epochs=5, nb=3))
    trainer.train(on_batch=cancel_during_first_epoch)
    assert [e.epoch for e in rec.of_kind("epoch")] == [1]
    assert [p.batch for p in rec.of_kind("progress")] == [1, 2]
    assert run.cancelled and trainer.stop
    assert any("cancel requested" in ln.text for b in rec.of_kind("log") for ln in b.lines)


def test_only_rank_zero_reports(tmp_path: Path, recorded, monkeypatch) -> None:
    _, rec = recorded
    monkeypatch.setenv("RANK", "1")
    kiln_ul.add_kiln_callbacks(FakeTrainer(tmp_path)).train()
    assert rec.events == []


def test_callbacks_dict_matches_ultralytics_hook_names() -> None:
    base = pytest.importorskip("ultralytics.utils.callbacks.base")
    assert set(kiln_ul.callbacks) <= set(base.default_callbacks)


@pytest.mark.parametrize("interval, expected", [
    # default 60 s: a run shorter than that stores its snapshot when it appears, the rolling ones at the end
    (None, [("epoch3.pt", 3), ("best.pt", 1), ("last.pt", 4)]),  # best.pt: written by epoch 1's save
    ("soon", [("epoch3.pt", 3), ("best.pt", 1), ("last.pt", 4)]),  # not a number: warned, 60 s
    ("0", [("best.pt", 1), ("last.pt", 1), ("last.pt", 2), ("epoch3.pt", 3), ("last.pt", 3), ("last.pt", 4),
           ("last.pt", 4)]),  # every save, then the optimizer-stripped final one
])
def test_checkpoints_are_stored_at_most_once_per_interval_and_always_at_the_end(
        tmp_path: Path, recorded, monkeypatch, interval: str | None, expected: list) -> None:
    run, rec = recorded
    if interval is None:
        monkeypatch.delenv(kiln_ul.CHECKPOINT_INTERVAL_ENV, raising=False)
    else:
        monkeypatch.setenv(kiln_ul.CHECKPOINT_INTERVAL_ENV, interval)
    requested: list[tuple[str, int | None]] = []
    store = run.artifact

    def spy(path, name=None, epoch=None):  # noqa: ANN001
        requested.append((name, epoch))
        store(path, name=name, epoch=epoch)

    monkeypatch.setattr(run, "artifact", spy)

    def save_period(epoch: int, batch: int) -> None:
        if (epoch, batch) == (2, 0):
            (tmp_path / "epoch3.pt").write_bytes(b"e3")  # Ultralytics' save_period file: new, stored at once

    trainer = kiln_ul.add_kiln_callbacks(FakeTrainer(tmp_path, epochs=4, nb=1))
    trainer.train(on_batch=save_period)
    assert requested == expected
    assert run.flush(10)
    stored = {(a.name, a.epoch) for a in rec.of_kind("artifact")}
    assert {("last.pt", 4), ("epoch3.pt", 3), ("best.pt", 1)} <= stored


def test_rolling_checkpoints_wait_one_interval_from_the_start_and_keep_the_epoch_that_wrote_them(
        tmp_path: Path, recorded, monkeypatch) -> None:
    """Epochs of 25 s (a fake clock) and the default 60 s interval: last.pt and best.pt are first stored at the
    save 75 s in, best.pt still labelled with epoch 1 (the save that wrote it), then last.pt once more at the end."""
    run, _ = recorded
    monkeypatch.delenv(kiln_ul.CHECKPOINT_INTERVAL_ENV, raising=False)
    now = [1000.0]
    monkeypatch.setattr(kiln_ul, "time", type("Clock", (), {"monotonic": staticmethod(lambda: now[0])}))
    requested: list[tuple[str, int | None]] = []
    monkeypatch.setattr(run, "artifact", lambda path, name=None, epoch=None: requested.append((name, epoch)))

    def tick(epoch: int, batch: int) -> None:
        now[0] += 25.0

    trainer = kiln_ul.add_kiln_callbacks(FakeTrainer(tmp_path, epochs=4, nb=1))
    trainer.train(on_batch=tick)
    assert requested == [("best.pt", 1), ("last.pt", 3), ("last.pt", 4)]
