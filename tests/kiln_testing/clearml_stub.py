"""Helpers for the ClearML forwarder tests: a local stub of the ClearML REST API and files server, and the
ClearML configuration those tests share (no tests here).

ClearML reads its configuration once per process, so every ClearML test of a pytest run uses the one
``clearml.conf`` written by :func:`clearml_env` (the stub's fixed port, few HTTP retries, no reporting
subprocess); the offline test switches offline mode on through the forwarder's settings.

The stub answers the endpoints the SDK calls (found by running the forwarder against it and logging every
request): ``auth.login``, ``projects.*``, ``tasks.*``, ``models.*``, ``events.add_batch`` and file uploads.  It
keeps tasks and models in memory, records every request, and can be switched *down* (connection refused, by
closing its socket) or *slow* (each answer delayed).
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from collections.abc import Callable

from kiln_testing import free_port

_JWT_HEADER = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"


def _token() -> str:
    import jwt  # PyJWT comes with clearml

    claims = {"api_version": "2.30", "server_version": "2.0.0", "feature_set": "basic", "env": "test",
              "exp": int(time.time()) + 24 * 3600, "identity": {"user": "kiln", "company": "kiln"}}
    return jwt.encode(claims, "kiln-clearml-stub-signing-key-0123456789", algorithm="HS256")


class Request:
    """One request the stub received: endpoint (``service.action``) and its JSON body (a list for batches)."""

    def __init__(self, endpoint: str, body: Any) -> None:
        self.endpoint, self.body = endpoint, body

    def __repr__(self) -> str:
        return f"Request({self.endpoint})"


class ClearMLStub:
    """A threaded HTTP server on 127.0.0.1 that plays the ClearML API server and files server."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.requests: list[Request] = []
        self.tasks: dict[str, dict[str, Any]] = {}
        self.models: dict[str, dict[str, Any]] = {}
        self.files: dict[str, int] = {}
        self.delay_s = 0.0  # answer this late (after doing the work, as a slow server does)
        self.delay_if: Callable[[str], bool] | None = None  # only these endpoints are slow
        self.fail_endpoints: set[str] = set()
        self.fail_if: Callable[[str, Any], bool] | None = None  # (endpoint, body) -> answer 500
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- control ------------------------------------------------------------------------------------
    def start(self) -> None:
        stub = self

        class Handler(_Handler):
            owner = stub

        self._server = _Server(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Go down: the port refuses connections until :meth:`start`."""
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.tasks.clear()
            self.models.clear()
            self.files.clear()
        self.delay_s = 0.0
        self.delay_if = None
        self.fail_endpoints.clear()
        self.fail_if = None

    # --- queries for assertions -----------------------------------------------------------------------
    def calls(self, endpoint: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.endpoint == endpoint]

    def events(self, task_id: str | None = None, type_: str | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for r in self.calls("events.add_batch"):
            for ev in r.body:
                if (task_id is None or ev.get("task") == task_id) and (type_ is None or ev.get("type") == type_):
                    out.append(ev)
        return out

    def scalars(self, task_id: str) -> set[tuple[str, str, int, float]]:
        return {(e["metric"], e["variant"], e["iter"], e["value"])
                for e in self.events(task_id, "training_stats_scalar")}

    # --- the API ------------------------------------------------------------------------------------
    def handle(self, endpoint: str, body: Any) -> tuple[int, Any]:
        with self._lock:
            self.requests.append(Request(endpoint, body))
        if endpoint in self.fail_endpoints or (self.fail_if and self.fail_if(endpoint, body)):
            return 500, None
        service, _, action = endpoint.partition(".")
        fn = getattr(self, f"_{service}_{action}", None)
        if fn is not None:
            return 200, fn(body if isinstance(body, dict) else {"requests": body})
        if service == "tasks" and isinstance(body, dict) and body.get("task") in self.tasks:
            return 200, self._task_update(action, body)
        return 200, {}

    def _auth_login(self, body: dict) -> dict:
        return {"token": _token()}

    def _server_info(self, body: dict) -> dict:
        return {"api_version": "2.30", "version": "2.0.0"}

    def _projects_get_all(self, body: dict) -> dict:
        pattern = body.get("name") or ""
        return {"projects": [{"id": f"p-{n}", "name": n} for n in self._project_names() if re.search(pattern, n)]}

    def _projects_create(self, body: dict) -> dict:
        return {"id": f"p-{body.get('name')}"}

    def _project_names(self) -> set[str]:
        with self._lock:
            return {r.body.get("name") for r in self.requests if r.endpoint == "projects.create"}

    def _tasks_create(self, body: dict) -> dict:
        tid = uuid.uuid4().hex
        self.tasks[tid] = {**body, "id": tid, "status": "created", "hyperparams": {}, "tags": body.get("tags", []),
                           "system_tags": body.get("system_tags", []), "execution": {"artifacts": []},
                           "models": {"input": [], "output": []},
                           "last_iteration": 0, "runtime": {}, "script": {}, "output": {}}
        return {"id": tid}

    def _tasks_get_by_id(self, body: dict) -> dict:
        return {"task": self.tasks.get(body.get("task"), {})}

    def _tasks_get_all(self, body: dict) -> dict:
        ids = body.get("id") or []
        ids = [ids] if isinstance(ids, str) else ids
        tags = set(body.get("system_tags") or [])
        found = [t for t in self.tasks.values()
                 if (not ids or t["id"] in ids) and (not tags or tags & set(t.get("system_tags") or []))]
        return {"tasks": found if ids or tags else []}

    _tasks_get_all_ex = _tasks_get_all

    def _task_update(self, action: str, body: dict) -> dict:
        task = self.tasks[body["task"]]
        status = {"started": "in_progress", "completed": "completed", "failed": "failed", "stopped": "stopped",
                  "close": "closed", "reset": "created"}.get(action)
        if status:
            task["status"] = status
            task["status_reason"] = body.get("status_reason")
            task["status_message"] = body.get("status_message")
        elif action == "edit_hyper_params":
            for p in body.get("hyperparams", []):
                task["hyperparams"].setdefault(p["section"], {})[p["name"]] = p
        elif action in ("edit", "update"):
            for k, v in body.items():
                if k not in ("task", "force"):
                    task[k] = v
        elif action == "add_or_update_artifacts":
            keys = {a["key"] for a in body.get("artifacts", [])}
            task["execution"]["artifacts"] = [a for a in task["execution"]["artifacts"] if a["key"] not in keys]
            task["execution"]["artifacts"] += body.get("artifacts", [])
        elif action == "add_or_update_model":
            task["models"].setdefault(body.get("type", "output"), []).append(
                {"name": body.get("name"), "model": body.get("model")})
        return {"updated": 1, "fields": {}}

    def _models_create(self, body: dict) -> dict:
        mid = uuid.uuid4().hex
        self.models[mid] = {**body, "id": mid, "ready": False}
        return {"id": mid, "created": True}

    def _models_get_by_id(self, body: dict) -> dict:
        return {"model": self.models.get(body.get("model"), {})}

    def _models_get_all(self, body: dict) -> dict:
        ids, tasks, name = body.get("id") or [], body.get("task") or [], body.get("name")
        ids = [ids] if isinstance(ids, str) else ids
        return {"models": [m for m in self.models.values() if (not ids or m["id"] in ids)
                           and (not tasks or m.get("task") in tasks) and (not name or re.search(name, m["name"]))]}

    def _models_update_for_task(self, body: dict) -> dict:
        mid = uuid.uuid4().hex
        self.models[mid] = {**body, "id": mid}
        return {"id": mid, "created": True, "updated": 1}

    def _models_edit(self, body: dict) -> dict:
        self.models.setdefault(body.get("model", ""), {}).update(body)
        return {"updated": 1, "fields": {}}

    _models_update = _models_edit

    def _events_add_batch(self, body: dict) -> dict:
        return {"added": len(body["requests"]), "errors": 0}


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up waiting (the slow-server tests) closes its socket: nothing to report


class _Handler(BaseHTTPRequestHandler):
    owner: ClearMLStub
    protocol_version = "HTTP/1.0"  # one connection per request: a stopped stub really refuses the next call

    def log_message(self, format: str, *args: Any) -> None:  # silent: requests are recorded instead
        pass

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _reply(self, status: int, data: Any, endpoint: str) -> None:
        payload = json.dumps({
            "meta": {"id": uuid.uuid4().hex, "trx": uuid.uuid4().hex,
                     "endpoint": {"name": endpoint, "requested_version": "2.30", "actual_version": "2.30"},
                     "result_code": status, "result_subcode": 0,
                     "result_msg": "OK" if status == 200 else "stub failure", "error_stack": ""},
            "data": data if data is not None else {},
        }).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _api(self) -> None:
        raw = self._body()
        path = self.path.split("?", 1)[0]
        if path.startswith("/files/") or (not path.startswith("/api/") and "." not in path.rsplit("/", 1)[-1]):
            return self._file(path, raw)
        endpoint = path.rsplit("/", 1)[-1]
        text = raw.decode("utf-8", "replace").strip()
        body: Any
        if endpoint.endswith("add_batch"):  # batch requests are newline-delimited JSON, one event a line
            body = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            body = json.loads(text) if text else {}
        status, data = self.owner.handle(endpoint, body)
        if self.owner.delay_s and (self.owner.delay_if is None or self.owner.delay_if(endpoint)):
            time.sleep(self.owner.delay_s)
        self._reply(status, data, endpoint)

    def _file(self, path: str, raw: bytes) -> None:
        with self.owner._lock:
            self.owner.files[path] = len(raw)
            self.owner.requests.append(Request("files.upload", {"path": path, "size": len(raw)}))
        self._reply(200, {}, "files.upload")

    do_POST = do_GET = do_PUT = _api


def write_clearml_conf(path: Path, stub_url: str) -> Path:
    """A clearml.conf for the stub: immediate close, one HTTP retry, short timeouts, uploads to the stub."""
    path.write_text(
        "api {\n"
        f"  api_server: {stub_url}\n  web_server: {stub_url}\n  files_server: {stub_url}/files\n"
        "  credentials { access_key: \"kiln\", secret_key: \"kiln\" }\n"
        "  http { retries { total: 1, connect: 1, read: 1, redirect: 1, status: 1, backoff_factor: 0.1,"
        " backoff_max: 0.2 }, wait_on_maintenance_forever: false }\n"
        "}\n"
        "sdk {\n  development { report_use_subprocess: false, worker { report_period_sec: 1 } }\n"
        "  network { metrics { file_upload_threads: 1 } }\n}\n"
    )
    return path


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


_ENV: dict[str, Any] = {}


def clearml_env(base: Path) -> dict[str, Any]:
    """Once per process: a stub port, a clearml.conf for it and a cache folder, exported before ClearML loads."""
    if not _ENV:
        port = free_port()
        base.mkdir(parents=True, exist_ok=True)
        conf = write_clearml_conf(base / "clearml.conf", f"http://127.0.0.1:{port}")
        cache = base / "cache"
        os.environ["CLEARML_CONFIG_FILE"] = str(conf)
        os.environ["CLEARML_CACHE_DIR"] = str(cache)
        os.environ.pop("CLEARML_OFFLINE_MODE", None)
        _ENV.update(port=port, config_file=conf, cache_dir=cache)
    return _ENV


# --- bus helpers ---------------------------------------------------------------------------------------------
def job_events(job_id: str, artifact: Path, project: str = "vision") -> list[Any]:
    """A whole job as the runner and the trainer publish it: starting, running, 3 epochs, logs, a model, done."""
    from kiln_contracts import (
        ArtifactStored, EpochCompleted, Event, JobFinished, JobStatus, JobStatusChanged, LogBatch, LogLine,
    )

    def ev(seq: int, source: str, data: Any) -> Event:
        return Event.new(job_id=job_id, project=project, attempt=1, seq=seq, source=source, data=data)

    epochs = [ev(i + 3, "trainer", EpochCompleted(epoch=i + 1, epochs=3, epoch_time=0.5, metrics={
        "train/box_loss": 1.0 / (i + 1), "metrics/mAP50(B)": 0.1 * (i + 1), "lr/pg0": 0.01 - 0.001 * i}))
        for i in range(3)]
    return [
        ev(1, "runner", JobStatusChanged(status=JobStatus.starting, runner="r1", host="h1", reason="claimed")),
        ev(2, "runner", JobStatusChanged(status=JobStatus.running, runner="r1", host="h1",
                                         details={"pid": 42, "dataset": "/data/coco8"})),
        *epochs,
        ev(6, "runner", LogBatch(lines=[LogLine(text="Epoch 1/3 loading"), LogLine(text="oops", stream="stderr")])),
        ev(7, "trainer", ArtifactStored(name="best.pt", uri=str(artifact), size=artifact.stat().st_size,
                                        sha256="0" * 64, epoch=3)),
        ev(8, "runner", JobFinished(status=JobStatus.completed)),
    ]


async def publish(js: Any, events: list[Any], copy: str = "") -> None:
    """Publish events; ``copy`` makes new Nats-Msg-Ids, so the stream stores them again (a replayed spool)."""
    for e in events:
        await js.publish(e.subject, e.to_bytes(), headers={"Nats-Msg-Id": f"{e.id}{copy}"})


async def drained(js: Any, durable: str = "clearml-forwarder") -> bool:
    """Both durables of the forwarder acked everything in their streams."""
    for stream, name in (("KILN_EVENTS", f"{durable}-events"), ("KILN_LOGS", f"{durable}-logs")):
        try:
            info = await js.consumer_info(stream, name)
        except Exception:  # noqa: BLE001 - not created yet
            return False
        if info.num_pending or info.num_ack_pending:
            return False
    return True


async def wait_for(pred: Any, timeout: float = 20.0) -> bool:
    import asyncio

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return True
        await asyncio.sleep(0.05)
    return False


async def task_record(js: Any, job_id: str) -> dict[str, Any] | None:
    try:
        kv = await js.key_value("kiln_clearml_tasks")
        return json.loads((await kv.get(job_id)).value)
    except Exception:  # noqa: BLE001 - bucket or key not there yet
        return None
