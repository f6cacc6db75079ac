"""The ClearML side: blocking calls, run by the forwarder in worker threads.  Two implementations of one port.

``RestClearML`` (a ClearML server) talks to the REST API through the SDK's ``APIClient`` on a ``StrictSession``:
every call either is accepted by the server or raises, within the HTTP retries and timeouts of the config.  The
SDK's ``Task`` methods and ``Logger`` are not used against a server on purpose: ``Logger.report_scalar`` sends in
the background and only logs a failure (the events are dropped), and ``Task`` calls retry a refused connection
forever inside ``InterfaceBase._send`` (measured with ClearML 2.1.12), so neither can tell the forwarder when to
ack nor be bounded in time.

``OfflineClearML`` (offline mode, no server) uses the SDK's ``Task`` and ``Logger``: each job gets its own offline
session folder (``$CLEARML_CACHE_DIR/offline/offline-<id>/``) that ``clearml-task --import-offline-session`` (or
``Task.import_offline_session``) can later upload.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from ..domain import ClearMLStatus, ConsoleLine, ParamValue, Scalar, Upload

log = logging.getLogger("kiln.clearml_forwarder")
_BATCH = 500  # events per events.add_batch request (the server limits a request's size)
_WORKER = "kiln-clearml-forwarder"
# The forwarder retries on its own (backoff, and a look-up before a create is repeated).  The SDK's HTTP layer
# only retries what cannot have reached the server: no read retries, since ClearML sends its calls as GET and
# urllib3 would repeat a timed-out tasks.create (measured: two tasks).  Replaces the config's api.http.retries.
_HTTP_RETRIES = {"total": 2, "connect": 1, "read": 0, "redirect": 2, "status": 1, "backoff_factor": 0.2,
                 "backoff_max": 2.0}


class PermanentError(Exception):
    """ClearML refused an operation for good (a 4xx answer): retrying it cannot help."""


class ClearMLPort(Protocol):
    """What the forwarder asks of ClearML.  Each method blocks, and returns only once ClearML accepted the call."""

    def open_task(self, job_id: str, project: str, name: str, tags: list[str], task_id: str | None) -> str: ...
    def connect_params(self, task_id: str, section: str, values: dict[str, ParamValue]) -> None: ...
    def report_scalars(self, task_id: str, points: tuple[Scalar, ...]) -> None: ...
    def report_console(self, task_id: str, lines: tuple[ConsoleLine, ...]) -> None: ...
    def upload(self, task_id: str, item: Upload) -> None: ...
    def set_status(self, task_id: str, status: ClearMLStatus, reason: str) -> None: ...
    def release(self, task_id: str) -> None: ...


def job_tag(job_id: str) -> str:
    """System tag that marks the task of one Kiln job (found again even when the job -> task map was lost)."""
    return f"kiln-job:{job_id}"


def _local_file(uri: str) -> Path | None:
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme else uri)
    return None


def _ms(line: ConsoleLine) -> int:
    return int((line.time.timestamp() if line.time else time.time()) * 1000)


def _param_type(v: ParamValue) -> str:
    return {bool: "bool", int: "int", float: "float"}.get(type(v), "str")


class RestClearML:
    """A ClearML server through its REST API (``APIClient`` + ``StorageManager`` for files)."""

    def __init__(self, config_file: Path | None = None, output_uri: str | None = None,
                 timeout_s: float = 30.0) -> None:
        self._config_file, self._output_uri, self._timeout_s = config_file, output_uri, timeout_s
        self._client: Any = None
        self._lock = threading.Lock()
        self._names: dict[str, tuple[str, str]] = {}  # task id -> (project, task name), for upload paths

    def _api(self) -> Any:
        """The API client, created on first use: a server that is down at start-up is retried like any call."""
        with self._lock:
            if self._client is None:
                from clearml.backend_api.session.client import APIClient, StrictSession

                connect = min(10.0, self._timeout_s)
                # requests' (connect, read) timeouts; the SDK's defaults wait 300 s for an answer
                timeouts = (connect, self._timeout_s)
                session_cls = type("KilnSession", (StrictSession,), {
                    "_session_timeout": timeouts, "_session_initial_timeout": timeouts,
                    "_write_session_timeout": (connect, max(self._timeout_s, 60.0)),
                })
                try:
                    session = session_cls(config_file=str(self._config_file) if self._config_file else None,
                                          http_retries_config=dict(_HTTP_RETRIES))
                except Exception as exc:  # MissingConfigError, LoginError, ConnectionError
                    raise ConnectionError(f"cannot reach ClearML: {exc}") from exc
                self._client = APIClient(session=session)
            return self._client

    def _call(self, service: str, action: str, **kw: Any) -> Any:
        from clearml.backend_api.session.client import APIError

        try:
            return getattr(getattr(self._api(), service), action)(**kw)
        except APIError as exc:
            if 400 <= exc.code < 500 and exc.code not in (401, 403, 408, 429):
                raise PermanentError(f"{service}.{action}: {exc}") from exc
            raise

    def _project_id(self, name: str) -> str:
        found = self._call("projects", "get_all", name=f"^{re.escape(name)}$", only_fields=["id"])
        if found:
            return str(found[0].id)
        return str(self._call("projects", "create", name=name, description="Kiln jobs").id)

    def open_task(self, job_id: str, project: str, name: str, tags: list[str], task_id: str | None) -> str:
        if task_id:
            found = self._call("tasks", "get_all", id=[task_id], only_fields=["id", "name"])
            if found:
                self._names[task_id] = (project, str(found[0].name or name))
                return task_id
            log.warning("task %s of job %s is gone from ClearML; creating a new one", task_id, job_id)
        else:  # the map may have lost it (or a create timed out after the server made it): look for the tag
            found = self._call("tasks", "get_all", system_tags=[job_tag(job_id)], only_fields=["id", "name"],
                               order_by=["-created"])
            if found:
                self._names[str(found[0].id)] = (project, str(found[0].name or name))
                return str(found[0].id)
        res = self._call("tasks", "create", name=name, project=self._project_id(project), type="training",
                         tags=tags, system_tags=[job_tag(job_id)], comment=f"Kiln job {job_id}")
        self._names[str(res.id)] = (project, name)
        return str(res.id)

    def connect_params(self, task_id: str, section: str, values: dict[str, ParamValue]) -> None:
        params = [{"section": section, "name": k, "value": "" if v is None else str(v), "type": _param_type(v)}
                  for k, v in values.items()]
        self._call("tasks", "edit_hyper_params", task=task_id, hyperparams=params, replace_hyperparams="none")

    def _add_events(self, events: list[dict[str, Any]]) -> None:
        for i in range(0, len(events), _BATCH):
            self._call("events", "add_batch", requests=events[i : i + _BATCH])

    def report_scalars(self, task_id: str, points: tuple[Scalar, ...]) -> None:
        now = int(time.time() * 1000)
        self._add_events([{"type": "training_stats_scalar", "task": task_id, "timestamp": now, "metric": p.title,
                           "variant": p.series, "value": p.value, "iter": p.iteration} for p in points])

    def report_console(self, task_id: str, lines: tuple[ConsoleLine, ...]) -> None:
        self._add_events([{"type": "log", "task": task_id, "timestamp": _ms(ln), "level": ln.level,
                           "worker": _WORKER, "msg": ln.text} for ln in lines])

    def _store(self, task_id: str, item: Upload, folder: str) -> str:
        """Upload a local file next to the task's other files; a remote URI is registered as it is."""
        path = _local_file(item.uri)
        if path is None:
            return item.uri
        if not path.is_file():  # the runner's disk is not shared with this host: keep a reference only
            log.warning("%s not found here; registering its path without uploading it", path)
            return path.as_uri()
        from clearml import StorageManager

        project, name = self._names.get(task_id, ("Kiln", task_id))
        base = (self._output_uri or self._api().session.get_files_server_host()).rstrip("/")
        remote = f"{base}/{project}/{name}.{task_id}/{folder}/{path.name}"
        url = StorageManager.upload_file(str(path), remote, wait_for_upload=True, retries=1)
        if not url:
            raise ConnectionError(f"upload of {path} to {remote} failed")
        return str(url)

    def upload(self, task_id: str, item: Upload) -> None:
        if item.as_model:
            uri = self._store(task_id, item, "models")
            project, _ = self._names.get(task_id, ("Kiln", task_id))
            existing = self._call("models", "get_all", task=[task_id], name=f"^{re.escape(item.name)}$",
                                  only_fields=["id"])
            if existing:
                model_id = str(existing[0].id)
                self._call("models", "edit", model=model_id, uri=uri, ready=True)
            else:
                model_id = str(self._call("models", "create", uri=uri, name=item.name, framework="PyTorch",
                                          project=self._project_id(project), task=task_id, ready=True,
                                          comment=f"sha256 {item.sha256}").id)
            self._call("tasks", "add_or_update_model", task=task_id, name=item.name, model=model_id, type="output")
            return
        uri = self._store(task_id, item, f"artifacts/{item.name}")
        artifact = {"key": item.name, "type": "custom", "mode": "output", "uri": uri, "content_size": item.size,
                    "hash": item.sha256, "timestamp": int(time.time())}
        self._call("tasks", "add_or_update_artifacts", task=task_id, artifacts=[artifact])

    def set_status(self, task_id: str, status: ClearMLStatus, reason: str) -> None:
        kw: dict[str, Any] = {"task": task_id, "force": True, "status_reason": reason[:200],
                              "status_message": reason[:200]}
        self._call("tasks", status, **kw)

    def release(self, task_id: str) -> None:
        self._names.pop(task_id, None)


class OfflineClearML:
    """ClearML's offline mode: every job's task writes an offline session folder; nothing goes on the network."""

    def __init__(self) -> None:
        from clearml import Task

        Task.set_offline(True)
        self._tasks: dict[str, Any] = {}

    @staticmethod
    def folder(task_id: str) -> Path:
        from clearml.config import get_offline_dir

        return Path(get_offline_dir(task_id=task_id))

    def open_task(self, job_id: str, project: str, name: str, tags: list[str], task_id: str | None) -> str:
        from clearml import Task

        if task_id and task_id in self._tasks:
            return task_id
        if task_id and (self.folder(task_id) / "task.json").is_file():
            self._tasks[task_id] = Task.get_task(task_id=task_id)  # reads the offline session back
            return task_id
        # Task.init binds one task to the process and Task.create refuses offline mode; Task._create is the
        # plain, unbound task both build on, so that many jobs can report side by side.
        task: Any = Task._create(project_name=project, task_name=name, task_type=Task.TaskTypes.training)
        task.add_tags([*tags, job_tag(job_id)])
        self._tasks[task.id] = task
        return str(task.id)

    def _task(self, task_id: str) -> Any:
        return self._tasks[task_id]

    def connect_params(self, task_id: str, section: str, values: dict[str, ParamValue]) -> None:
        self._task(task_id).update_parameters({f"{section}/{k}": v for k, v in values.items()})

    def report_scalars(self, task_id: str, points: tuple[Scalar, ...]) -> None:
        logger = self._task(task_id).get_logger()
        for p in points:
            logger.report_scalar(p.title, p.series, p.value, iteration=p.iteration)
        logger.flush(wait=True)

    def report_console(self, task_id: str, lines: tuple[ConsoleLine, ...]) -> None:
        logger = self._task(task_id).get_logger()
        levels = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
        for ln in lines:
            logger.report_text(ln.text, level=levels[ln.level], print_console=False)
        logger.flush(wait=True)

    def upload(self, task_id: str, item: Upload) -> None:
        # OutputModel does not work offline ('DummyModel' object has no attribute 'locked'): an artifact it is
        path = _local_file(item.uri)
        obj: Any = str(path) if path is not None and path.is_file() else item.uri
        self._task(task_id).upload_artifact(item.name, artifact_object=obj, wait_on_upload=True,
                                            metadata={"sha256": item.sha256, "model": str(item.as_model)})

    def set_status(self, task_id: str, status: ClearMLStatus, reason: str) -> None:
        task = self._task(task_id)
        if status == "started":
            task.mark_started(force=True)
        elif status == "completed":
            task.mark_completed(ignore_errors=True, status_message=reason, force=True)
        elif status == "failed":
            task.mark_failed(ignore_errors=True, status_reason=reason, force=True)
        else:
            task.mark_stopped(force=True, status_message=reason)

    def release(self, task_id: str) -> None:
        task: Any = self._tasks.pop(task_id, None)
        if task is not None:
            task.close()  # writes the session zip


def make_clearml(offline: bool, config_file: Path | None, output_uri: str | None, timeout_s: float) -> ClearMLPort:
    """The adapter for the settings; ClearML reads ``CLEARML_CONFIG_FILE`` for what this process shares (files)."""
    if config_file and not os.environ.get("CLEARML_CONFIG_FILE"):
        os.environ["CLEARML_CONFIG_FILE"] = str(config_file)
    if offline:
        return OfflineClearML()
    return RestClearML(config_file, output_uri, timeout_s)

