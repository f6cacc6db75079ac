"""ClearML forwarder, pure part: which operations a job's events produce (no NATS, no ClearML)."""

from __future__ import annotations

from kiln_clearml_forwarder.domain import (
    ConnectParams, JobState, ReportConsole, ReportScalars, Scalar, SetStatus, Upload, apply, coalesce, split_metric,
)
from kiln_contracts import (
    ArtifactStored, EpochCompleted, Event, JobFinished, JobStatus, JobStatusChanged, LogBatch, LogLine, MetricsLogged,
)


def _ev(data, attempt: int = 1, seq: int = 1) -> Event:
    return Event.new(job_id="j", project="p", attempt=attempt, seq=seq, source="runner", data=data)


def test_metric_names_group_like_ultralytics():
    assert split_metric("train/box_loss") == ("train", "box_loss")
    assert split_metric("metrics/mAP50-95(B)") == ("metrics", "mAP50-95(B)")
    assert split_metric("lr/pg0") == ("lr", "pg0")
    assert split_metric("val/cls/extra") == ("val", "cls/extra")
    assert split_metric("fitness") == ("fitness", "fitness")
    assert split_metric("odd/") == ("odd/", "odd/")


def test_a_job_from_start_to_end():
    st = JobState("j", "p")
    assert apply(st, _ev(JobStatusChanged(status=JobStatus.queued))) == []
    ops = apply(st, _ev(JobStatusChanged(status=JobStatus.starting, runner="r1", host="h")))
    assert [type(o) for o in ops] == [SetStatus, ConnectParams, ReportConsole]
    assert ops[0] == SetStatus("started", "first event from Kiln")
    assert ops[1] == ConnectParams({"runner": "r1", "host": "h"})
    ops = apply(st, _ev(JobStatusChanged(status=JobStatus.running, runner="r1", host="h", details={"pid": 7})))
    assert ops[0] == ConnectParams({"pid": 7})  # only what changed
    ops = apply(st, _ev(EpochCompleted(epoch=2, epochs=5, metrics={"train/box_loss": 0.5}, epoch_time=1.5)))
    assert ops == [ConnectParams({"epochs": 5}), ReportScalars((Scalar("train", "box_loss", 0.5, 2),
                                                                Scalar("Epoch Time", "Epoch Time", 1.5, 2)))]
    ops = apply(st, _ev(MetricsLogged(step=9, metrics={"custom": 1.0})))
    assert ops == [ReportScalars((Scalar("custom", "custom", 1.0, 9),))]
    (console,) = apply(st, _ev(LogBatch(lines=[LogLine(text="a"), LogLine(text="b", stream="stderr")])))
    assert [(ln.text, ln.level) for ln in console.lines] == [("a", "info"), ("b", "warning")]
    for name in ("last.pt", "best.pt"):
        assert apply(st, _ev(ArtifactStored(name=name, uri=f"/w/{name}", size=3, sha256="x"))) == []
    ops = apply(st, _ev(JobFinished(status=JobStatus.failed, reason="oom", exit_code=137)))
    assert [(o.name, o.as_model) for o in ops if isinstance(o, Upload)] == [("best.pt", True), ("last.pt", False)]
    assert ops[-1] == SetStatus("failed", "oom") and st.finished
    assert st.record() == {"task_id": None, "project": "p", "status": "failed", "attempt": 1, "started": True}


def test_redelivered_and_late_events():
    st = JobState("j", "p")
    ev = _ev(EpochCompleted(epoch=1, epochs=1, metrics={"train/box_loss": 1.0}))
    assert apply(st, ev) and apply(st, ev) == []  # the same event id twice: once
    assert apply(st, _ev(JobFinished(status=JobStatus.cancelled)))[-1] == SetStatus("stopped", "cancelled")
    assert apply(st, _ev(JobFinished(status=JobStatus.completed))) == []  # terminal never changes
    assert apply(st, _ev(JobStatusChanged(status=JobStatus.running))) == []  # nor goes back to running
    late = apply(st, _ev(LogBatch(lines=[LogLine(text="late")])))
    assert [type(o) for o in late] == [ReportConsole]  # a late log line still goes to the task


def test_finished_before_anything_else_does_not_start_the_task():
    st = JobState("j", "p")
    ops = apply(st, _ev(JobFinished(status=JobStatus.failed, reason="bad dataset")))
    assert [type(o) for o in ops] == [ReportConsole, SetStatus] and ops[-1].status == "failed"


def test_restored_state_continues_where_the_map_left_it():
    st = JobState.from_record("j", "p", {"task_id": "t1", "project": "p", "status": "running", "attempt": 1,
                                         "started": True})
    ops = apply(st, _ev(JobFinished(status=JobStatus.completed)))
    assert ops[-1] == SetStatus("completed", "completed") and st.task_id == "t1"


def test_coalesce_merges_neighbours_only():
    a, b = ReportScalars((Scalar("t", "s", 1.0, 1),)), ReportScalars((Scalar("t", "s", 2.0, 2),))
    done = SetStatus("completed")
    assert coalesce([a, b, done, a]) == [ReportScalars(a.points + b.points), done, a]
    assert coalesce([ConnectParams({"x": 1}), ConnectParams({"y": 2})]) == [ConnectParams({"x": 1, "y": 2})]


async def test_disabled_forwarder_does_nothing():
    from kiln_clearml_forwarder.main import run
    from kiln_clearml_forwarder.settings import Settings

    await run(Settings(enabled=False, nats_url="nats://127.0.0.1:1"))  # returns at once, connects to nothing
    assert Settings().enabled is False and Settings().durable == "clearml-forwarder"
