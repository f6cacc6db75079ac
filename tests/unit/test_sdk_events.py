"""SDK unit tests: runs with a RecordingReporter, envelopes, queue coalescing, spool files, standalone mode."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
from kiln_contracts import Event

import kiln_sdk
from kiln_sdk import FileReporter, JobContext, NullReporter, RecordingReporter, Reporter, Run
from kiln_sdk._events import EventFactory
from kiln_sdk._queue import Marker, RecordQueue
from kiln_sdk.spool import Spool


def recording_run(tmp_path: Path | None = None) -> tuple[Run, RecordingReporter]:
    rec = RecordingReporter(job_id="j1", project="p1", attempt=3)
    ctx = JobContext(job_id="j1", project="p1", attempt=3, job_dir=tmp_path or Path("."))
    return Run(ctx, rec), rec


def test_every_call_becomes_one_numbered_trainer_event(tmp_path: Path) -> None:
    run, rec = recording_run(tmp_path)
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(b"weights" * 100)
    run.log_metrics(5, {"loss": 0.5, "n": 3})
    run.progress(1, 10, 4, 20, images_per_s=100.0, eta_s=12.0)
    run.epoch(1, 10, {"train/box_loss": 1.5, "metrics/mAP50(B)": 0.25}, epoch_time=3.5)
    run.artifact(ckpt, epoch=1)  # hashed and announced by a background thread
    assert run.flush(5)
    run.log("hello")

    assert [e.seq for e in rec.events] == [1, 2, 3, 4, 5]
    assert [e.data.kind for e in rec.events] == ["metrics", "progress", "epoch", "artifact", "log"]
    assert {(e.source, e.job_id, e.project, e.attempt) for e in rec.events} == {("trainer", "j1", "p1", 3)}
    assert len({e.id for e in rec.events}) == 5
    assert rec.events[0].subject == "kiln.evt.p1.j1.metrics"
    assert rec.events[4].subject == "kiln.log.p1.j1"
    assert rec.events[0].data.metrics == {"loss": 0.5, "n": 3.0}
    art = rec.events[3].data
    assert (art.name, art.size, art.epoch, art.uri) == ("last.pt", 700, 1, str(ckpt.resolve()))
    assert art.sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    for ev in rec.events:  # what goes on the wire reads back as the same contract
        assert Event.model_validate_json(ev.to_bytes()) == ev


def test_bad_input_is_left_out_without_a_seq_gap_or_an_exception(tmp_path: Path, capsys) -> None:
    run, rec = recording_run(tmp_path)
    run.epoch(0, 10, {"x": 1.0})  # epochs are 1-based: invalid
    run.log_metrics(1, {"ok": 1.0, "nan": math.nan, "inf": math.inf, "text": "abc"})
    run.artifact(tmp_path / "missing.pt")
    run.log_metrics(2, {"ok": 2.0})
    assert [(e.seq, e.data.step, e.data.metrics) for e in rec.events] == [(1, 1, {"ok": 1.0}), (2, 2, {"ok": 2.0})]
    assert "kiln_sdk:" in capsys.readouterr().err


def test_tensor_and_numpy_values_become_floats() -> None:
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    run, rec = recording_run()
    run.log_metrics(1, {"a": np.float32(0.5), "b": torch.tensor(2.0), "c": np.int64(3)})
    assert rec.events[0].data.metrics == {"a": 0.5, "b": 2.0, "c": 3.0}


def test_a_reporter_that_raises_never_reaches_training() -> None:
    class Broken(Reporter):
        def submit(self, record):  # noqa: ANN001
            raise OSError("disk on fire")

        def close(self, timeout: float = 10.0) -> bool:
            raise OSError("still on fire")

    run = Run(JobContext(job_id="j"), Broken())
    run.log_metrics(1, {"x": 1})
    run.log("x")
    assert run.finish() is False and run.finished


def test_consecutive_log_lines_share_one_batch() -> None:
    f = EventFactory("j1")
    recs = [("log", 1.0, {"text": "a"}), ("log", 2.0, {"text": "b"}), ("metrics", 3.0, {"step": 1, "metrics": {}}),
            ("log", 4.0, {"text": "c"})]
    events = f.build_many(recs)
    assert [e.data.kind for e in events] == ["log", "metrics", "log"]
    assert [ln.text for ln in events[0].data.lines] == ["a", "b"]
    assert [e.seq for e in events] == [1, 2, 3]


def test_queue_coalesces_metrics_per_step_and_key_when_full() -> None:
    q = RecordQueue(maxsize=2)
    q.put(("metrics", 0.0, {"step": 1, "metrics": {"a": 1.0}}))
    q.put(("metrics", 0.0, {"step": 2, "metrics": {"a": 2.0}}))
    q.put(("metrics", 1.0, {"step": 3, "metrics": {"a": 3.0, "b": 1.0}}))  # full from here on
    q.put(("metrics", 2.0, {"step": 3, "metrics": {"a": 30.0}}))
    q.put(("metrics", 3.0, {"step": 4, "metrics": {"a": 4.0}}))
    q.put(("epoch", 4.0, {"epoch": 1}))  # never coalesced, never dropped
    q.put(("progress", 5.0, {"batch": 1}))
    q.put(("progress", 6.0, {"batch": 2}))  # supersedes the previous progress
    out = q.drain(100)
    assert [(r[0], r[2]) for r in out] == [
        ("metrics", {"step": 1, "metrics": {"a": 1.0}}),
        ("metrics", {"step": 2, "metrics": {"a": 2.0}}),
        ("epoch", {"epoch": 1}),
        ("metrics", {"step": 3, "metrics": {"a": 30.0, "b": 1.0}, "coalesced": 1}),
        ("metrics", {"step": 4, "metrics": {"a": 4.0}, "coalesced": 0}),
        ("progress", {"batch": 2}),
    ]
    assert q.coalesced_total == 1 and len(q) == 0


def test_coalescing_memory_is_bounded_even_with_a_new_step_each_time() -> None:
    q = RecordQueue(maxsize=1, max_steps=3)
    for step in range(100):
        q.put(("metrics", float(step), {"step": step, "metrics": {"loss": float(step)}}))
    out = q.drain(1000)
    assert len(out) == 4  # 1 queued + 3 steps kept
    assert out[-1][2] == {"step": 99, "metrics": {"loss": 99.0}, "coalesced": 96}
    assert sum(r[2].get("coalesced", 0) for r in out) + len(out) == 100


def test_a_flush_marker_never_overtakes_coalesced_updates() -> None:
    q = RecordQueue(maxsize=1)
    q.put(("metrics", 0.0, {"step": 1, "metrics": {"a": 1.0}}))
    q.put(("metrics", 0.0, {"step": 2, "metrics": {"a": 2.0}}))
    marker = Marker()
    q.put(marker)
    out = q.drain(100)
    assert out.index(marker) == 2


def test_spool_appends_replays_from_offset_and_skips_a_torn_line(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append([b'{"a":1}', b'{"a":2}'])
    lines = spool.read(10)
    assert [ln for ln, _ in lines] == [b'{"a":1}', b'{"a":2}']
    spool.commit(lines[0][1])
    spool.close()
    with open(spool.path, "ab") as fh:
        fh.write(b'{"torn')  # the trainer was killed mid-write
    again = Spool(tmp_path)  # a new process (the runner) sees the committed offset
    assert [ln for ln, _ in again.read(10)] == [b'{"a":2}']
    again.commit(lines[1][1])
    assert again.pending  # only the torn line is left
    again.clear()
    assert not spool.path.exists() and not (tmp_path / "events.offset").exists()


def test_outside_kiln_the_sdk_is_a_no_op(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cancel").touch()  # a stray file named cancel means nothing outside Kiln
    run = kiln_sdk.init(env={})
    try:
        assert isinstance(run.reporter, NullReporter)
        assert kiln_sdk.current() is run and kiln_sdk.init(env={}) is run
        kiln_sdk.log_metrics(1, {"loss": 1.0})
        kiln_sdk.epoch(1, 2, {"loss": 1.0})
        kiln_sdk.log("nothing happens")
        assert not run.cancel_requested
    finally:
        assert kiln_sdk.finish()
    assert kiln_sdk.current() is None
    assert list(tmp_path.iterdir()) == [tmp_path / "cancel"]


def test_kiln_sdk_file_writes_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with kiln_sdk.init(env={"KILN_SDK_FILE": str(path)}) as run:
        assert isinstance(run.reporter, FileReporter)
        for i in range(3):
            run.log_metrics(i, {"loss": float(i)})
    events = [Event.model_validate_json(line) for line in path.read_text().splitlines()]
    assert [(e.seq, e.data.step) for e in events] == [(1, 0), (2, 1), (3, 2)]
    assert json.loads(path.read_text().splitlines()[0])["source"] == "trainer"


def test_context_manager_sets_the_final_status(tmp_path: Path) -> None:
    run, _ = recording_run(tmp_path)
    with pytest.raises(ValueError):
        with run:
            raise ValueError("training bug")
    assert run.status == "failed"

    run, _ = recording_run(tmp_path)
    with run:
        (tmp_path / "cancel").touch()
        assert run.cancel_requested and run.should_stop()
    assert run.status == "cancelled" and run.cancelled


def test_job_context_from_env(tmp_path: Path) -> None:
    env = {"KILN_JOB_ID": "j9", "KILN_PROJECT": "vision", "KILN_ATTEMPT": "x", "KILN_NATS_URL": "nats://h:1",
           "KILN_JOB_DIR": str(tmp_path), "KILN_DATASET": "/d/data.yaml", "KILN_RESUME": "/w/last.pt"}
    ctx = JobContext.from_env(env)
    assert (ctx.job_id, ctx.project, ctx.attempt, ctx.nats_url) == ("j9", "vision", 1, "nats://h:1")
    assert (ctx.spool_dir, ctx.dataset, ctx.resume) == (tmp_path / "spool", "/d/data.yaml", "/w/last.pt")
    assert ctx.in_kiln and ctx.load_spec() is None
    assert JobContext.from_env({**env, "KILN_SPOOL_DIR": "/s"}).spool_dir == Path("/s")


def test_the_publishers_fast_json_is_byte_for_byte_what_the_models_write() -> None:
    np = pytest.importorskip("numpy")
    t = 1_700_000_000.123456
    records = [
        ("metrics", t, {"step": 1, "metrics": {"loss": 0.1, "lr": 1e-05, "n": 3, "big": 1e300, "neg": -0.0}}),
        ("log", t, {"text": "a"}),
        ("log", t + 1, {"text": "b"}),
        ("metrics", t + 2, {"step": 2, "metrics": {"é/ü \"q\"": 2.5}, "coalesced": 4}),  # escaped key
        ("metrics", t + 3, {"step": 3, "metrics": {"np": np.float32(0.5), "nan": math.nan, "ok": 1.0}}),  # slow path
        ("metrics", t + 4, {"step": 4, "metrics": {"flag": True}}),  # bools are not metrics values: slow path
        ("epoch", t + 5, {"epoch": 1, "epochs": 2, "metrics": {"x": 1.0}, "epoch_time": 2.0}),
        ("progress", t + 6, {"epoch": 1, "epochs": 2, "batch": 1, "batches": 2, "images_per_s": None, "eta_s": 1.0}),
        ("metrics", t + 7, {"step": -1, "metrics": {"x": 1.0}}),  # invalid: left out, no seq taken
        ("metrics", t + 8, {"step": 5, "metrics": {}}),
    ]
    fast, slow = EventFactory("j1", "p1", 3), EventFactory("j1", "p1", 3)
    slow._id_prefix, slow.publisher = fast._id_prefix, fast.publisher
    msgs = fast.serialize_many(records)
    events = slow.build_many(records)
    assert [(m[0], m[1], m[2]) for m in msgs] == [(e.subject, e.model_dump_json().encode(), e.id) for e in events]
    assert [e.seq for e in events] == list(range(1, 9)) and fast.seq == slow.seq == 8
    assert Event.model_validate_json(msgs[0][1]).data.metrics == {"loss": 0.1, "lr": 1e-05, "n": 3.0, "big": 1e300,
                                                                  "neg": -0.0}
    assert len({m[2] for m in msgs}) == len(msgs)


def test_event_ids_are_unique_across_factories() -> None:
    ids = {EventFactory("j1").build(("metrics", 0.0, {"step": 1, "metrics": {}})).id for _ in range(1000)}
    assert len(ids) == 1000
