"""The job -> ClearML task map in a NATS KV bucket, so that a restart or a redelivery reuses the job's task."""

from __future__ import annotations

import json
from typing import Any

from nats.js import JetStreamContext
from kiln_contracts import streams
from nats.js.errors import BucketNotFoundError, KeyNotFoundError

BUCKET = streams.CLEARML_TASKS_BUCKET


class TaskMap:
    """Key: job id; value: JSON ``{"task_id", "project", "status", "attempt", "started"}``."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext, bucket: str = BUCKET) -> TaskMap:
        """Open the bucket, creating it on first use (one value per key: the current record)."""
        try:
            kv = await js.key_value(bucket)
        except BucketNotFoundError:
            kv = await js.create_key_value(bucket=bucket, history=1,
                                           description="Kiln job id -> ClearML task id (clearml-forwarder)")
        return cls(kv)

    async def get(self, job_id: str) -> dict[str, Any] | None:
        try:
            entry = await self.kv.get(job_id)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        rec = json.loads(entry.value)
        return rec if isinstance(rec, dict) and rec.get("task_id") else None

    async def put(self, job_id: str, record: dict[str, Any]) -> None:
        await self.kv.put(job_id, json.dumps(record, separators=(",", ":")).encode())
