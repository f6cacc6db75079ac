"""kiln_observability's metrics, health, JetStream state and HTTP server; the API's route labels; the writer's
point count. Pure or in memory (the server on a loopback port)."""

from __future__ import annotations

import asyncio
import doctest
import importlib
from datetime import UTC, datetime
from types import SimpleNamespace as NS

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from kiln_api.metrics import ApiMetrics, RequestMetrics, route_templates
from kiln_contracts import EpochCompleted, Event, Heartbeat, MetricsLogged
from kiln_metrics_writer.decode import Points
from kiln_metrics_writer.domain import count_points
from kiln_observability import (
    Collected,
    Health,
    JetStreamStats,
    LoopCounter,
    LoopHistogram,
    gauge,
    new_registry,
    render,
    serve,
)
from kiln_observability.asgi import add_routes
from prometheus_client.parser import text_string_to_metric_families


def samples(registry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = render(registry)[0].decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.mark.parametrize("name", ["kiln_observability.logs", "kiln_observability.metrics",
                                  "kiln_observability.health", "kiln_observability.jetstream",
                                  "kiln_observability.server", "kiln_metrics_writer.domain"])
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0


def test_loop_histogram_buckets_are_cumulative_and_inclusive():
    reg = new_registry(process=False)
    h = LoopHistogram("kiln_t_seconds", "t", (0.1, 1.0), registry=reg)
    for v in (0.05, 0.1, 0.5, 1.0, 3.0):
        h.observe(v)
    got = samples(reg)
    assert [got[("kiln_t_seconds_bucket", (("le", le),))] for le in ("0.1", "1.0", "+Inf")] == [2, 4, 5]
    assert got[("kiln_t_seconds_count", ())] == 5 and got[("kiln_t_seconds_sum", ())] == pytest.approx(4.65)


def test_loop_counter_and_collected_values_appear_when_scraped():
    reg = new_registry(process=False)
    c = LoopCounter("kiln_t_sent_total", "sent", ("kind",), registry=reg)
    c.inc("live")
    c.inc("replay", amount=4)
    state = {"n": 1}
    Collected(lambda: [gauge("kiln_t_clients", "clients", state["n"]),
                       gauge("kiln_t_slots", "slots", {("a",): 2, ("b",): 3}, ["pool"])], reg)
    state["n"] = 7
    got = samples(reg)
    assert got[("kiln_t_sent_total", (("kind", "live"),))] == 1 and got[("kiln_t_sent_total", (("kind", "replay"),))] == 4
    assert got[("kiln_t_clients", ())] == 7 and got[("kiln_t_slots", (("pool", "b"),))] == 3


def test_a_registry_per_service_so_two_live_in_one_process():
    a, b = new_registry(), new_registry()
    for reg in (a, b):
        LoopCounter("kiln_t_same_total", "same name in both", registry=reg).inc()
    assert b"process_cpu_seconds_total" in render(a)[0] and b"_created" not in render(b)[0]


async def test_readiness_fails_on_a_false_raising_or_hanging_check_and_while_draining(monkeypatch):
    import kiln_observability.health as health_mod

    monkeypatch.setattr(health_mod, "CHECK_TIMEOUT_S", 0.05)
    health = Health()
    health.add("ok", lambda: True)
    assert await health.ready() == (True, {"ok": True, "draining": False})

    async def hangs() -> bool:
        await asyncio.sleep(10)
        return True

    def raises() -> bool:
        raise ConnectionError("db down")

    for name, check in (("false", lambda: False), ("raises", raises), ("hangs", hangs)):
        h = Health()
        h.add("ok", lambda: True)
        h.add(name, check)
        ok, checks = await h.ready()
        assert not ok and checks[name] is False and checks["ok"] is True
    health.draining = True
    assert await health.ready() == (False, {"ok": True, "draining": True})


class FakeJS:
    def __init__(self) -> None:
        self.missing: set[str] = set()

    async def stream_info(self, name):
        if name in self.missing:
            raise LookupError(name)
        return NS(state=NS(messages=10, bytes=2048, consumer_count=3))

    async def consumer_info(self, stream, name):
        if name in self.missing:
            raise LookupError(name)
        return NS(num_pending=4, num_ack_pending=2, num_redelivered=1, num_waiting=1)


async def test_jetstream_state_is_read_into_gauges_and_a_failed_read_leaves_the_series_out():
    reg, js = new_registry(process=False), FakeJS()
    stats = JetStreamStats(js, ["KILN_EVENTS"], [("KILN_EVENTS", "metrics-writer-events")], registry=reg)
    await stats.refresh()
    got = samples(reg)
    durable = (("consumer", "metrics-writer-events"), ("stream", "KILN_EVENTS"))
    assert got[("kiln_jetstream_stream_messages", (("stream", "KILN_EVENTS"),))] == 10
    assert got[("kiln_jetstream_stream_bytes", (("stream", "KILN_EVENTS"),))] == 2048
    assert got[("kiln_jetstream_consumer_pending_messages", durable)] == 4
    assert got[("kiln_jetstream_consumer_ack_pending_messages", durable)] == 2
    assert got[("kiln_jetstream_state_read_errors_total", ())] == 0
    js.missing = {"KILN_EVENTS", "metrics-writer-events"}
    await stats.refresh()
    got = samples(reg)
    assert ("kiln_jetstream_consumer_pending_messages", durable) not in got  # not a stale value
    assert got[("kiln_jetstream_state_read_errors_total", ())] == 2


async def _http(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data


async def test_the_small_server_answers_metrics_livez_readyz_and_nothing_else():
    reg, health, up = new_registry(process=False), Health(), {"nats": True}
    LoopCounter("kiln_t_things_total", "things", registry=reg).inc()
    health.add("nats", lambda: up["nats"])
    server = await serve("127.0.0.1", 0, reg, health)
    try:
        assert (await _http(server.port, b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 200 OK")
        ready = await _http(server.port, b"GET /readyz HTTP/1.1\r\n\r\n")
        assert ready.startswith(b"HTTP/1.1 200") and b'"nats": true' in ready
        up["nats"] = False
        assert (await _http(server.port, b"GET /readyz?verbose=1 HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 503")
        assert (await _http(server.port, b"GET /healthz HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 503")
        metrics = await _http(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert b"text/plain" in metrics and b"kiln_t_things_total 1.0" in metrics
        head = await _http(server.port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert head.endswith(b"\r\n\r\n") and b"kiln_t_things" not in head
        assert (await _http(server.port, b"GET /nope HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
        assert (await _http(server.port, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405")
        assert await _http(server.port, b"garbage\r\n\r\n") == b""  # closed, and the server goes on
        assert (await _http(server.port, b"GET /livez HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200")
    finally:
        await server.close()


def _app() -> tuple[FastAPI, ApiMetrics]:
    reg = new_registry(process=False)
    metrics, health = ApiMetrics(reg), Health()
    app = FastAPI()
    inner = APIRouter(prefix="/jobs")

    @inner.get("/{job_id}")
    async def get_job(job_id: str) -> dict[str, str]:
        if job_id == "boom":
            raise RuntimeError("boom")
        return {"id": job_id}

    outer = APIRouter(prefix="/api/v1")
    outer.include_router(inner)
    app.include_router(outer)
    app.add_middleware(RequestMetrics, metrics=metrics, templates=lambda: route_templates(app))
    add_routes(app, reg, health)
    return app, metrics


def test_api_requests_are_labelled_by_route_template_not_by_path():
    app, _ = _app()
    with TestClient(app, raise_server_exceptions=False) as client:
        for job in ("a", "b", "c"):
            assert client.get(f"/api/v1/jobs/{job}").status_code == 200
        assert client.get("/api/v1/jobs/boom").status_code == 500
        assert client.get("/wp-login.php").status_code == 404
        assert client.request("BREW", "/api/v1/jobs/a").status_code == 405
        got = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(client.get("/metrics").text) for s in f.samples}
        assert client.get("/livez").json() == {"status": "alive"}
        assert client.get("/readyz").json() == {"status": "ready", "checks": {"draining": False}}
    route = ("route", "/api/v1/jobs/{job_id}")
    assert got[("kiln_api_requests_total", (("method", "GET"), route, ("status", "200")))] == 3
    assert got[("kiln_api_requests_total", (("method", "GET"), route, ("status", "500")))] == 1
    assert got[("kiln_api_requests_total", (("method", "GET"), ("route", "unmatched"), ("status", "404")))] == 1
    assert got[("kiln_api_requests_total", (("method", "other"), route, ("status", "405")))] == 1
    assert got[("kiln_api_request_duration_seconds_count", (("method", "GET"), route))] == 4
    assert got[("kiln_api_requests_in_progress", ())] == 1  # the scrape itself


def test_points_are_the_metric_values_of_metrics_and_epoch_events():
    now = datetime.now(UTC)

    def ev(data) -> Event:  # type: ignore[no-untyped-def]
        return Event.new(job_id="j", project="p", attempt=1, seq=1, source="trainer", data=data)

    batch = [Points("e1", "j", 1, now, 1, {"a": 1.0, "b": 2.0}, b"{}"),
             ev(MetricsLogged(step=2, metrics={"a": float("nan")})),
             ev(EpochCompleted(epoch=1, epochs=2, metrics={"x": 1.0, "y": 2.0, "z": 3.0})),
             ev(Heartbeat(runner="r"))]
    assert count_points(batch) == 6 and count_points([]) == 0
