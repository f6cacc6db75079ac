"""Kiln's Python client: typed REST calls and live events, sync (:class:`Kiln`) and async (:class:`AsyncKiln`).

Example:
    >>> from kiln_client import Kiln
    >>> with Kiln() as kiln:  # KILN_URL / KILN_API_KEY, or what `kiln login` saved  # doctest: +SKIP
    ...     job = kiln.create_job({"model": "yolov8n.yaml", "dataset": "s3://data/shapes", "train": {"epochs": 5}})
    ...     finished = [ev for ev in kiln.follow(job.id)][-1]
    ...     print(finished.event.data.status)

Job specs and events are the contracts' models (``kiln_contracts.JobSpec``, ``kiln_contracts.Event``); every refusal
is a :class:`KilnError` with the HTTP status and the API's ``detail``.
"""

from .aclient import AsyncKiln
from .client import Kiln
from .download import Downloaded
from .errors import KilnError
from .live import Watch, WatchTimeout
from .models import (
    ApiKey,
    Artifact,
    EpochRow,
    Job,
    JobDetail,
    KeyCreated,
    LiveEvent,
    LogEntry,
    Me,
    Metrics,
    Project,
    Series,
    Ticket,
)

__all__ = [
    "ApiKey",
    "Artifact",
    "AsyncKiln",
    "Downloaded",
    "EpochRow",
    "Job",
    "JobDetail",
    "KeyCreated",
    "Kiln",
    "KilnError",
    "LiveEvent",
    "LogEntry",
    "Me",
    "Metrics",
    "Project",
    "Series",
    "Ticket",
    "Watch",
    "WatchTimeout",
]
