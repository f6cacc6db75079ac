"""Metrics, health and structured logs on real parts: a real nats-server (stopped and restarted), the runner and
the metrics-writer as real processes with JSON logs, the notifier (uvicorn) and the API (TestClient) in-process, the
ClearML forwarder's run() in-process with an in-memory ClearML; a tiny job through the REST API and the SDK trainer.

Every metric docs/operations.md lists must exist, and the ones a job moves must move by what the job did."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from kiln_clearml_forwarder.main import run as run_forwarder
from kiln_clearml_forwarder.settings import Settings as ForwarderSettings
from kiln_contracts import JobStatus
from kiln_observability import Observability
from kiln_testing import free_port
from kiln_testing.api import api_client
from kiln_testing.notifier import running_notifier, ticket, ws_connect
from kiln_testing.runners import publish_start, spec
from kiln_testing.writer import WriterProc, drained
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
SDK_TRAINER = str(ROOT / "tests" / "fixtures" / "sdk_trainer.py")
Scrape = dict[str, list[tuple[dict[str, str], float]]]


# -- helpers ------------------------------------------------------------------------------------------------------
def parse(text: str) -> Scrape:
    """Sample name -> [(labels, value)], with each family's own name too (counters: without ``_total``)."""
    out: Scrape = {}
    for family in text_string_to_metric_families(text):
        out.setdefault(family.name, [])
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def value(scrape: Scrape, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when there is none)."""
    return sum(v for got, v in scrape.get(name, []) if labels.items() <= got.items())


async def scrape(url: str) -> Scrape:
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(f"{url}/metrics")
    assert response.status_code == 200, response.text
    return parse(response.text)


async def ready(url: str) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(f"{url}/readyz")
    return response.status_code, response.json()


async def until(pred: Callable[[], Any], what: str, timeout: float = 30.0, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = await pred()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(every)


def documented_metrics() -> dict[str, set[str]]:
    """docs/operations.md's metric tables: section (service) -> metric names."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("### Metrics", 1)[1].split("\n### ", 1)[0]
    out: dict[str, set[str]] = {}
    current = ""
    for line in section.splitlines():
        if line.startswith("#### "):
            current = line[5:].split(" (", 1)[0].strip()
        elif m := re.match(r"\| `(kiln_[a-z_]+)`", line):
            out.setdefault(current, set()).add(m.group(1))
    return out


class MemoryClearML:
    """A ClearML that accepts everything (the forwarder's ClearMLPort), remembering what it was told."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def open_task(self, job_id: str, project: str, name: str, tags: list[str], task_id: str | None) -> str:
        self.calls.append("open_task")
        return task_id or f"task-{job_id}"

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: self.calls.append(name)


@pytest.fixture()
def dataset(tmp_path: Path) -> str:
    d = tmp_path / "ds"
    d.mkdir()
    (d / "data.yaml").write_text("path: .\ntrain: images\nval: images\nnames: {0: a}\n")
    return str(d)


# -- the test -----------------------------------------------------------------------------------------------------
async def test_metrics_health_and_json_logs_follow_a_job(bus, nats_server, runners, dataset, tmp_path, monkeypatch):
    _, js, log = bus
    monkeypatch.setenv("KILN_LOG_FORMAT", "json")  # for the two service processes started below
    ports = {name: free_port() for name in ("runner", "writer", "forwarder")}
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    writer = WriterProc(nats_server.url, f"sqlite+aiosqlite:///{tmp_path / 'k.db'}", tmp_path / "writer.log",
                        metrics_port=ports["writer"]).start()
    runner = runners("r1", trainer_cmd=[sys.executable, SDK_TRAINER], metrics_port=ports["runner"],
                     shutdown_grace_s=1, cancel_grace_s=1, kill_grace_s=1)
    forwarder_obs, stop_forwarder = Observability(), asyncio.Event()
    forwarder = asyncio.create_task(run_forwarder(
        ForwarderSettings(enabled=True, nats_url=nats_server.url, fetch_ms=50, linger_s=0.3,
                          metrics_port=ports["forwarder"]), stop_forwarder, clearml=MemoryClearML(), obs=forwarder_obs))
    try:
        with running_notifier(nats_server.url) as notifier, \
                api_client(tmp_path, nats_url=nats_server.url) as api:
            url["notifier"] = f"http://{notifier}"
            await writer.ready()
            await runner.ready()
            for name in ("runner", "writer", "forwarder", "notifier"):
                await until(lambda name=name: _is(ready(url[name]), 200), f"{name} ready")
            assert api.get("/readyz").status_code == 200 and api.get("/livez").json() == {"status": "alive"}
            assert api.get("/healthz").json() == {"status": "ok", "nats": True}  # unchanged

            before = {name: await scrape(url[name]) for name in ("runner", "writer")}
            assert value(before["runner"], "kiln_runner_trainers_running") == 0
            assert value(before["writer"], "kiln_writer_points_written_total") == 0

            # -- a job through the API, watched over a WebSocket --------------------------------------------------
            created = api.post("/api/v1/jobs", json={"model": "yolov8n.yaml", "dataset": dataset,
                                                     "train": {"epochs": 1}})
            assert created.status_code == 201, created.text
            job_id = created.json()["id"]
            async with ws_connect(notifier, f"/api/v1/ws/jobs/{job_id}", ticket({job_id: "default"})) as ws:
                received: list[dict[str, Any]] = []
                reader = asyncio.create_task(_read_all(ws, received))
                await until(lambda: _true(any(m["type"] == "subscribed" for m in received)), "subscribed")
                assert api.post(f"/api/v1/jobs/{job_id}/start").status_code == 202

                seen_running = await until(lambda: _gauge(url["runner"], "kiln_runner_trainers_running", 1),
                                           "a trainer running", timeout=60, every=0.05)
                assert seen_running
                busy = await scrape(url["runner"])
                assert value(busy, "kiln_runner_slots_busy") == 1 and value(busy, "kiln_runner_slots") == 1
                await log.wait(lambda: log.finished(job_id), timeout=60)
                await until(lambda: _gauge(url["runner"], "kiln_runner_trainers_running", 0), "trainer gone")
                await until(lambda: _true(any(m["type"] == "event" and m["event"]["data"]["kind"] == "finished"
                                              for m in received)), "the end on the socket")
                during = parse(await _text(f"{url['notifier']}/metrics"))
                assert value(during, "kiln_notifier_clients_connected") == 1
                live = value(during, "kiln_notifier_messages_sent_total", kind="live")
                assert live >= sum(m["type"] == "event" for m in received) > 0
                assert value(during, "kiln_notifier_publish_to_send_seconds_count") == live
                reader.cancel()
            assert log.finished(job_id)[0].data.status == JobStatus.completed
            await until(lambda: _gauge(url["notifier"], "kiln_notifier_clients_connected", 0), "client gone")

            # -- what each service counted -------------------------------------------------------------------------
            await until(lambda: drained(js), "the writer caught up")

            def read_caught_up(s: Scrape) -> bool:  # JetStream's state is read every 5 s: wait for a fresh one
                lag = [v for name in ("kiln_jetstream_consumer_pending_messages",
                                      "kiln_jetstream_consumer_ack_pending_messages") for _, v in s.get(name, [])]
                return bool(lag) and not any(lag) and \
                    value(s, "kiln_jetstream_stream_messages", stream="KILN_EVENTS") == len(log.events)

            w = await until(lambda: _when(url["writer"], read_caught_up), "the writer's lag read as 0", timeout=15)
            logged = sum(len(e.data.metrics) for e in log.events if e.data.kind in ("metrics", "epoch"))
            assert logged >= 10  # the SDK trainer's 10 steps (and whatever system metrics it sampled)
            assert value(w, "kiln_writer_points_written_total") == logged
            assert value(w, "kiln_writer_events_written_total", stream="KILN_EVENTS") == len(log.events)
            assert value(w, "kiln_writer_events_written_total", stream="KILN_LOGS") > 0
            assert value(w, "kiln_writer_batch_size_events_count") > 0
            assert value(w, "kiln_writer_commit_duration_seconds_count") == value(w, "kiln_writer_batch_size_events_count")
            assert 0 <= value(w, "kiln_writer_last_commit_age_seconds") < 60
            assert value(w, "kiln_writer_dead_letters_total") == 0
            assert value(w, "kiln_jetstream_consumer_pending_messages", consumer="metrics-writer-events") == 0
            assert value(w, "kiln_jetstream_stream_messages", stream="KILN_EVENTS") == len(log.events)

            r = await scrape(url["runner"])
            assert value(r, "kiln_runner_attempts_total", outcome="completed", exit_class="ok") == 1
            assert value(r, "kiln_runner_claim_duration_seconds_count") == 1
            assert value(r, "kiln_runner_spawn_duration_seconds_count") == 1
            assert value(r, "kiln_runner_slots_busy") == 0 and value(r, "kiln_runner_last_heartbeat_age_seconds") == 0
            assert value(r, "kiln_jetstream_consumer_pending_messages", consumer="runner-default") == 0

            f = await until(lambda: _at_least(url["forwarder"], "kiln_clearml_messages_acked_total", 1), "forwarded")
            assert value(f, "kiln_clearml_events_received_total") > 0
            assert value(f, "kiln_clearml_operations_total", result="ok") > 0

            other = api.post("/api/v1/jobs", json={"model": "yolov8n.yaml", "dataset": dataset}).json()["id"]
            assert api.post(f"/api/v1/jobs/{other}/cancel").status_code == 202
            assert api.get("/api/v1/jobs/nope").status_code == 404
            a = parse(api.get("/metrics").text)
            assert value(a, "kiln_api_requests_total", method="POST", route="/api/v1/jobs", status="201") == 2
            assert value(a, "kiln_api_requests_total", route="/api/v1/jobs/{job_id}/start", status="202") == 1
            assert value(a, "kiln_api_requests_total", route="/api/v1/jobs/{job_id}", status="404") == 1
            assert value(a, "kiln_api_request_duration_seconds_count", route="/api/v1/jobs") == 2
            for counter, n in (("created", 2), ("started", 1), ("cancelled", 1)):
                assert value(a, f"kiln_api_jobs_{counter}_total", pool="default") == n, counter
            assert value(a, "kiln_jetstream_stream_messages", stream="KILN_JOBS") >= 0

            # -- every documented metric is exposed ----------------------------------------------------------------
            scrapes = {"API": a, "Runner": r, "Metrics writer": w, "Notifier": parse(await _text(
                f"{url['notifier']}/metrics")), "ClearML forwarder": await scrape(url["forwarder"])}
            documented = documented_metrics()
            assert set(documented) == {*scrapes, "JetStream"}, documented.keys()
            for section, names in documented.items():
                where = [scrapes[section]] if section in scrapes else [a, r, w]
                for name in names:  # a counter's family is named without _total (it may have no series yet)
                    assert any(name in s or name.removesuffix("_total") in s for s in where), \
                        f"{name} ({section}) is documented but not exposed"

            # -- readiness follows NATS ---------------------------------------------------------------------------
            nats_server.stop()
            for name in ("runner", "writer", "forwarder", "notifier"):
                _, body = await until(lambda name=name: _status(ready(url[name]), 503), f"{name} not ready")
                assert body["checks"]["nats"] is False, (name, body)
            assert api.get("/readyz").status_code == 503 and api.get("/livez").status_code == 200
            async with httpx.AsyncClient() as client:
                assert (await client.get(f"{url['runner']}/livez")).status_code == 200
            nats_server.start()
            for name in ("runner", "writer", "forwarder", "notifier"):
                await until(lambda name=name: _is(ready(url[name]), 200), f"{name} ready again", timeout=30)
            await until(lambda: _true(api.get("/readyz").status_code == 200), "API ready again")

            # -- a draining runner is not ready -------------------------------------------------------------------
            await publish_start(js, "long", spec(dataset, seconds=30))
            await log.wait(lambda: any(e.data.status == JobStatus.running for e in log.of("long", "status")),
                           timeout=60)
            runner.kill(signal.SIGTERM)
            _, body = await until(lambda: _status(ready(url["runner"]), 503), "runner draining", every=0.02)
            assert body["checks"]["draining"] is True and body["checks"]["nats"] is True
            assert runner.proc.wait(30) == 0
    finally:
        stop_forwarder.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(forwarder, 15)
        await writer.stop()

    # -- JSON lines, the job named on every line about it ------------------------------------------------------
    for path in (runner.log_path, tmp_path / "writer.log"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        assert lines and all({"time", "level", "logger", "message", "service", "job_id", "attempt", "project",
                              "trace_id"} <= line.keys() for line in lines), path
    runner_lines = [json.loads(line) for line in runner.log_path.read_text().splitlines() if line.strip()]
    about_job = [line for line in runner_lines if job_id in line["message"]]
    assert about_job and all(line["job_id"] == job_id and line["attempt"] == 1 and line["project"] == "default"
                             and line["trace_id"] == "" for line in about_job), about_job
    assert any(line["job_id"] == "long" for line in runner_lines)


# -- small async predicates for ``until`` ---------------------------------------------------------------------------
async def _true(x: Any) -> Any:
    return x


async def _text(url: str) -> str:
    async with httpx.AsyncClient(timeout=5) as client:
        return (await client.get(url)).text


async def _is(answer: Any, code: int) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return (await answer)[0] == code
    return False


async def _status(answer: Any, code: int) -> tuple[int, dict[str, Any]] | None:
    with contextlib.suppress(httpx.HTTPError):
        got = await answer
        return got if got[0] == code else None
    return None


async def _gauge(url: str, name: str, want: float) -> bool:
    return value(await scrape(url), name) == want


async def _at_least(url: str, name: str, want: float) -> Scrape | None:
    got = await scrape(url)
    return got if value(got, name) >= want else None


async def _when(url: str, pred: Callable[[Scrape], bool]) -> Scrape | None:
    got = await scrape(url)
    return got if pred(got) else None


async def _read_all(ws: Any, into: list[dict[str, Any]]) -> None:
    with contextlib.suppress(Exception):
        async for raw in ws:
            into.append(json.loads(raw))
