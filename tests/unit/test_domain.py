"""Pure logic of the runner (exit classification) and the metrics-writer (rows, status projection)."""

from datetime import datetime, timezone

from kiln_contracts import (
    EpochCompleted, Event, ExitClass, Heartbeat, JobFinished, JobStatus, JobStatusChanged, LogBatch, LogLine,
    MetricsLogged,
)
from kiln_metrics_writer.domain import project_status, to_rows
from kiln_runner.domain import classify_exit

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def ev(data, attempt=1, seq=1, job="j1"):
    return Event.new(job_id=job, project="p", attempt=attempt, seq=seq, source="runner", data=data)


def test_exit_classification():
    assert classify_exit(0, []).status == JobStatus.completed
    out = classify_exit(2, ["Traceback", "kiln: dataset not found: /x"])
    assert (out.status, out.exit_class, out.reason) == (JobStatus.failed, ExitClass.user_error, "dataset not found: /x")
    assert classify_exit(-9, []).exit_class == ExitClass.killed
    assert "SIGKILL" in classify_exit(-9, []).reason
    assert classify_exit(1, ["torch.OutOfMemoryError: CUDA out of memory"]).exit_class == ExitClass.out_of_memory
    assert classify_exit(-15, [], cancelled=True).status == JobStatus.cancelled
    assert classify_exit(3, []).status == JobStatus.cancelled
    assert classify_exit(-15, [], timed_out=True).exit_class == ExitClass.timeout
    assert classify_exit(1, ["ValueError: bad"]).reason == "trainer exited with code 1: ValueError: bad"


def test_rows_from_events():
    rows = to_rows([
        ev(EpochCompleted(epoch=1, epochs=2, metrics={"a": 1.0, "b": 2.0}, epoch_time=3.0)),
        ev(LogBatch(lines=[LogLine(text="x"), LogLine(text="y")])),
        ev(JobStatusChanged(status=JobStatus.running)),
    ])
    assert [(r["kind"], r["step"], r["values"]) for r in rows.metric_events] == [
        ("epoch", 1, {"a": 1.0, "b": 2.0, "time/epoch": 3.0})]
    assert [r["line_no"] for r in rows.logs] == [0, 1]
    assert rows.status_events[0]["status"] == "running"


def test_non_finite_metric_values_become_json_strings():
    rows = to_rows([ev(MetricsLogged(step=3, metrics={"a": float("nan"), "b": float("inf"), "c": -float("inf"),
                                                     "d": 0.5}))])
    assert rows.metric_events[0]["values"] == {"a": "NaN", "b": "Infinity", "c": "-Infinity", "d": 0.5}
    assert (rows.metric_events[0]["kind"], rows.metric_events[0]["step"]) == ("metrics", 3)


def test_status_projection_lifecycle():
    row = project_status(None, [ev(JobStatusChanged(status=JobStatus.queued), seq=1),
                                ev(JobStatusChanged(status=JobStatus.running, runner="r"), seq=2),
                                ev(EpochCompleted(epoch=1, epochs=2, metrics={}), seq=3),
                                ev(Heartbeat(runner="r"), seq=4)], NOW)
    assert row["status"] == "running" and row["epoch"] == 1 and row["runner"] == "r" and row["started_at"]
    done = project_status(row, [ev(JobFinished(status=JobStatus.completed), seq=5)], NOW)
    assert done["status"] == "completed" and done["finished_at"]
    # terminal never changes, events of an old attempt are ignored, duplicates change nothing
    assert project_status(done, [ev(JobStatusChanged(status=JobStatus.running), seq=6)], NOW) is None
    assert project_status(done, [ev(JobFinished(status=JobStatus.completed), seq=5)], NOW) is None
    later = project_status({**row, "attempt": 2}, [ev(JobFinished(status=JobStatus.failed), attempt=1)], NOW)
    assert later is None
