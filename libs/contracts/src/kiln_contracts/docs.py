"""Writes the AsyncAPI 3.0 document and the JSON Schema of every Kiln message into ``docs/``.

Run ``kiln-contracts-docs docs/`` (or ``python -m kiln_contracts.docs docs/``); a test checks the committed files
are current.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from . import streams, subjects
from .audit import AuditRecorded
from .commands import CancelJob, StartJob
from .events import PAYLOADS, Event

_REF = "#/components/schemas/{model}"
_DEFS_REF = "#/$defs/{model}"
DIALECT = "https://json-schema.org/draft/2020-12/schema"
NATS_PORT = 14222  # the bundled nats-server of `kiln up`


def json_schemas(ref_template: str = _REF) -> dict[str, Any]:
    """JSON Schema of the envelope, every payload and the commands, keyed by model name.

    References between them follow ``ref_template``: ``#/components/schemas/...`` inside the AsyncAPI document,
    ``#/$defs/...`` in the standalone schema file.
    """
    models: list[type[BaseModel]] = [Event, StartJob, CancelJob, AuditRecorded, *PAYLOADS]
    _, top = models_json_schema([(m, "validation") for m in models], ref_template=ref_template)
    return top.get("$defs", {})


def events_schema() -> dict[str, Any]:
    """``docs/events.schema.json``: a standalone JSON Schema (2020-12) that validates one Kiln event.

    Every message schema is in ``$defs`` (``StartJob``, ``CancelJob`` and each payload too); validate another one
    with ``{"$ref": "<file>#/$defs/StartJob"}``.
    """
    return {"$schema": DIALECT, "$id": "https://kiln.dev/schemas/events.schema.json", "title": "Kiln event",
            "description": "One Kiln event envelope (KILN_EVENTS and KILN_LOGS); data.kind selects the payload.",
            "$ref": "#/$defs/Event", "$defs": json_schemas(_DEFS_REF)}


def _message(name: str, summary: str, payload_ref: str, msg_id: str) -> dict[str, Any]:
    return {
        "name": name, "title": name, "summary": summary, "contentType": "application/json",
        "payload": {"$ref": payload_ref},
        "headers": {"type": "object", "properties": {"Nats-Msg-Id": {"type": "string", "description": msg_id}}},
    }


def asyncapi() -> dict[str, Any]:
    schemas = json_schemas()
    channels: dict[str, Any] = {
        "startJob": {"address": subjects.START_ADDRESS,
                     "description": f"Stream {streams.JOBS.name} (work queue). One runner of the pool takes each command.",
                     "parameters": {"pool": {"description": "Runner pool chosen by the job."}},
                     "messages": {"StartJob": _message("StartJob", "Run one attempt of a job.",
                                                       _REF.format(model="StartJob"), "<job_id>:<attempt>")}},
        "cancelJob": {"address": subjects.CANCEL_ADDRESS, "description": "Core NATS; runners holding the job act.",
                      "parameters": {"job_id": {"description": "Job id."}},
                      "messages": {"CancelJob": _message("CancelJob", "Stop a running job.",
                                                         _REF.format(model="CancelJob"), "not set")}},
        "deadLetters": {"address": subjects.DLQ_ADDRESS,
                        "description": f"Stream {streams.DLQ.name}. The poison message as received; headers "
                                       "Kiln-Reason, Kiln-Stream-Seq and Kiln-Subject say why and where from.",
                        "parameters": {"consumer": {"description": "Consumer that rejected it."}},
                        "messages": {"DeadLetter": {"name": "DeadLetter", "contentType": "application/octet-stream",
                                                    "payload": {"type": "string"}}}},
        "audit": {"address": subjects.AUDIT_ADDRESS,
                  "description": f"Stream {streams.AUDIT.name}. Who created, started, cancelled, re-ran a job, created "
                                 "or revoked a key, changed a membership, created a user or project, signed in or "
                                 "out. Project '_instance' holds records outside any project. Never holds a secret.",
                  "parameters": {"project": {"description": "Project, or _instance."},
                                 "action": {"description": "AuditAction value."}},
                  "messages": {"AuditRecorded": _message("AuditRecorded", "One audited action.",
                                                         _REF.format(model="AuditRecorded"), "the record id")}},
        "logs": {"address": subjects.LOG_ADDRESS,
                 "description": f"Stream {streams.LOGS.name}. Envelope with data.kind = 'log'.",
                 "parameters": {"project": {"description": "Project."}, "job_id": {"description": "Job id."}},
                 "messages": {"LogBatch": _message("LogBatch", "Consecutive log lines.", _REF.format(model="Event"),
                                                   "the envelope id")}},
    }
    for payload in PAYLOADS:
        kind = payload.model_fields["kind"].default
        if kind == "log":
            continue
        channels[f"event_{kind}"] = {
            "address": subjects.EVENT_ADDRESS % kind,
            "description": f"Stream {streams.EVENTS.name}. The Event envelope whose data is {payload.__name__}: "
                           + (payload.__doc__ or "").strip().splitlines()[0],
            "parameters": {"project": {"description": "Project."}, "job_id": {"description": "Job id."}},
            "messages": {payload.__name__: _message(payload.__name__, (payload.__doc__ or "").strip().splitlines()[0],
                                                    _REF.format(model="Event"), "the envelope id")},
        }
    operations = {}
    for name, ch in channels.items():
        action = "receive" if name in ("startJob", "cancelJob") else "send"
        operations[f"{action}_{name}"] = {
            "action": action, "channel": {"$ref": f"#/channels/{name}"},
            "messages": [{"$ref": f"#/channels/{name}/messages/{m}"} for m in ch["messages"]],
        }
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "Kiln events", "version": "1.0.0",
                 "description": "Commands and events of Kiln on NATS JetStream. Every event is one Event envelope; "
                                "consumers de-duplicate on its id (also the Nats-Msg-Id) and ignore unknown fields."},
        "defaultContentType": "application/json",
        "servers": {"local": {"host": "{host}:{port}", "protocol": "nats",
                              "description": "The NATS of a Kiln installation; `kiln up` runs one on 127.0.0.1:14222.",
                              "variables": {"host": {"default": "127.0.0.1", "description": "NATS host."},
                                            "port": {"default": str(NATS_PORT), "description": "NATS client port "
                                                     "(14222 with `kiln up`, 4222 for a stand-alone nats-server)."}}}},
        "channels": channels, "operations": operations, "components": {"schemas": schemas},
    }


def write(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {out_dir / "asyncapi.json": asyncapi(), out_dir / "events.schema.json": events_schema()}
    for path, doc in files.items():
        path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return list(files)


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs")
    for p in write(out):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
