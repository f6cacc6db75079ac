"""Contract tests: every message round-trips through JSON; subjects; lifecycle rules; docs are current."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from kiln_contracts import (
    ArtifactStored, EpochCompleted, Event, ExitClass, Heartbeat, JobFinished, JobSpec, JobStatus, JobStatusChanged,
    LogBatch, LogLine, MetricsLogged, Progress, StartJob, TrainArgs, status_wins, subjects,
)
from kiln_contracts.docs import asyncapi, events_schema

PAYLOADS = [
    JobStatusChanged(status=JobStatus.running, runner="r1", host="h", details={"pid": 12}),
    EpochCompleted(epoch=1, epochs=3, metrics={"train/box_loss": 1.5, "metrics/mAP50(B)": 0.1}, epoch_time=2.5),
    MetricsLogged(step=7, metrics={"loss": 0.5}, coalesced=3),
    Progress(epoch=1, epochs=3, batch=4, batches=10, images_per_s=33.0, eta_s=12.0),
    ArtifactStored(name="last.pt", uri="/tmp/last.pt", size=10, sha256="ab" * 32, epoch=2),
    Heartbeat(runner="r1", pid=5),
    JobFinished(status=JobStatus.failed, reason="boom", exit_code=1, exit_class=ExitClass.user_error, last_logs=["x"]),
    LogBatch(lines=[LogLine(text="hello"), LogLine(stream="stderr", text="warn")]),
]


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: p.kind)
def test_event_round_trips_through_json(payload):
    ev = Event.new(job_id="job1", project="proj", attempt=2, seq=5, source="trainer", data=payload)
    back = Event.model_validate_json(ev.to_bytes())
    assert back == ev
    assert back.data.kind == payload.kind
    assert ev.headers() == {"Nats-Msg-Id": ev.id}
    expected = subjects.log("proj", "job1") if payload.kind == "log" else subjects.event("proj", "job1", payload.kind)
    assert ev.subject == expected


def test_unknown_fields_are_ignored_and_unknown_versions_rejected():
    ev = Event.new(job_id="j", project="p", attempt=1, seq=1, source="runner", data=Heartbeat(runner="r"))
    doc = json.loads(ev.to_bytes())
    doc["future_field"] = 1
    doc["data"]["also_new"] = "x"
    assert Event.model_validate(doc).id == ev.id
    doc["v"] = 2
    with pytest.raises(ValidationError):
        Event.model_validate(doc)


def test_start_command_round_trip_and_msg_id():
    cmd = StartJob(job_id="abc", attempt=3, spec=JobSpec(model="yolov8n.yaml", dataset="/data", pool="gpu-a100"))
    assert StartJob.model_validate_json(cmd.model_dump_json()) == cmd
    assert cmd.msg_id == "abc:3"
    assert cmd.subject == "kiln.cmd.start.gpu-a100"


@pytest.mark.parametrize("bad", [
    {"model": "yolov8n.yaml", "dataset": ""},
    {"model": "yolov8n", "dataset": "/d"},
    {"model": "../x.pt", "dataset": "/d"},
    {"model": "m.yaml", "dataset": "http://x/y"},
    {"model": "m.yaml", "dataset": "/d", "train": {"epochs": 0}},
    {"model": "m.yaml", "dataset": "/d", "train": {"imgsz": 65}},
    {"model": "m.yaml", "dataset": "/d", "train": {"not_an_arg": 1}},
    {"model": "m.yaml", "dataset": "/d", "pool": "a.b"},
])
def test_invalid_specs_are_rejected(bad):
    with pytest.raises(ValidationError):
        JobSpec.model_validate(bad)


def test_subject_tokens_are_checked():
    assert subjects.job_events("j1") == "kiln.evt.*.j1.>"
    with pytest.raises(ValueError):
        subjects.event("p", "a.b", "status")
    with pytest.raises(ValueError):
        subjects.start("*")


def test_status_rules():
    S = JobStatus
    assert status_wins(None, 0, S.queued, 1)
    assert status_wins(S.queued, 1, S.running, 1)
    assert not status_wins(S.completed, 1, S.running, 1)  # terminal never changes
    assert not status_wins(S.running, 1, S.starting, 1)  # no going back within an attempt
    assert not status_wins(S.running, 2, S.failed, 1)  # older attempt ignored
    assert status_wins(S.running, 1, S.queued, 2)  # a retry attempt takes over


def test_train_args_defaults_are_safe_offline():
    args = TrainArgs()
    assert args.plots is False and args.workers == 0


def test_committed_docs_are_current():
    docs = Path(__file__).resolve().parents[2] / "docs"
    assert json.loads((docs / "asyncapi.json").read_text()) == json.loads(json.dumps(asyncapi(), sort_keys=True)), \
        "docs/asyncapi.json is stale: run python -m kiln_contracts.docs docs"
    assert json.loads((docs / "events.schema.json").read_text()) == json.loads(json.dumps(events_schema())), \
        "docs/events.schema.json is stale: run python -m kiln_contracts.docs docs"


def test_events_doctests() -> None:
    import doctest

    from kiln_contracts import events

    assert doctest.testmod(events).failed == 0
