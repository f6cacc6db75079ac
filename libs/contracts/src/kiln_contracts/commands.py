"""Commands: imperative messages that ask a service to do something."""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator

from . import subjects

SCHEMA_VERSION = 1


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class ExitClass(str, Enum):
    """How an attempt ended, as the runner classifies it."""

    ok = "ok"
    user_error = "user_error"
    out_of_memory = "out_of_memory"
    killed = "killed"
    cancelled = "cancelled"
    timeout = "timeout"
    infrastructure = "infrastructure"


NEVER_RETRIED = frozenset({ExitClass.ok, ExitClass.user_error, ExitClass.cancelled})
"""A user error fails the same way again; a cancel is what the user asked for."""


class Task(str, Enum):
    detect = "detect"
    segment = "segment"
    classify = "classify"
    pose = "pose"
    obb = "obb"


class Optimizer(str, Enum):
    auto = "auto"
    SGD = "SGD"
    Adam = "Adam"
    AdamW = "AdamW"
    NAdam = "NAdam"
    RAdam = "RAdam"
    RMSProp = "RMSProp"


class TrainArgs(BaseModel):
    """Ultralytics ``train()`` arguments Kiln accepts (an allow-list; unknown names are rejected).

    Example:
        >>> TrainArgs(epochs=3, imgsz=64, batch=8).epochs
        3
    """

    # Strict types (no "2" or true for an integer) and finite numbers only: what the trainer will accept.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    epochs: StrictInt = Field(10, ge=1, le=10_000, description="Number of training epochs.")
    imgsz: StrictInt = Field(640, ge=32, le=8192, description="Input image size in pixels (multiple of 32).")
    batch: StrictInt = Field(16, ge=-1, le=4096,
                             description="Batch size; -1 lets Ultralytics choose (AutoBatch, GPU only).")
    device: str | None = Field(None, pattern=r"^(cpu|mps|\d+(,\d+)*)$", description="Device; normally set by the runner's slot.")
    workers: StrictInt = Field(0, ge=0, le=64, description="Data loader worker processes.")
    seed: StrictInt = Field(0, ge=0, le=2**32 - 1, description="Random seed (recorded for reproducibility).")
    deterministic: StrictBool = Field(True, description="Use deterministic algorithms.")
    optimizer: Optimizer = Field(Optimizer.auto, description="Optimizer.")
    lr0: StrictFloat = Field(0.01, gt=0, le=1, description="Initial learning rate.")
    lrf: StrictFloat = Field(0.01, gt=0, le=1, description="Final learning rate as a fraction of lr0.")
    momentum: StrictFloat = Field(0.937, ge=0, le=1, description="SGD momentum / Adam beta1.")
    weight_decay: StrictFloat = Field(0.0005, ge=0, le=1, description="Optimizer weight decay.")
    warmup_epochs: StrictFloat = Field(3.0, ge=0, le=100, description="Warm-up epochs.")
    cos_lr: StrictBool = Field(False, description="Cosine learning-rate schedule.")
    patience: StrictInt = Field(100, ge=0, le=10_000, description="Epochs without improvement before early stop.")
    nbs: StrictInt = Field(64, ge=1, le=4096, description="Nominal batch size for loss scaling.")
    close_mosaic: StrictInt = Field(10, ge=0, le=10_000, description="Disable mosaic for the last N epochs.")
    mosaic: StrictFloat = Field(1.0, ge=0, le=1, description="Mosaic augmentation probability.")
    mixup: StrictFloat = Field(0.0, ge=0, le=1, description="MixUp augmentation probability.")
    fliplr: StrictFloat = Field(0.5, ge=0, le=1, description="Horizontal flip probability.")
    flipud: StrictFloat = Field(0.0, ge=0, le=1, description="Vertical flip probability.")
    hsv_h: StrictFloat = Field(0.015, ge=0, le=1, description="HSV hue augmentation.")
    hsv_s: StrictFloat = Field(0.7, ge=0, le=1, description="HSV saturation augmentation.")
    hsv_v: StrictFloat = Field(0.4, ge=0, le=1, description="HSV value augmentation.")
    degrees: StrictFloat = Field(0.0, ge=-180, le=180, description="Rotation augmentation (degrees).")
    translate: StrictFloat = Field(0.1, ge=0, le=1, description="Translation augmentation fraction.")
    scale: StrictFloat = Field(0.5, ge=0, le=1, description="Scale augmentation gain.")
    fraction: StrictFloat = Field(1.0, gt=0, le=1, description="Fraction of the training set to use.")
    single_cls: StrictBool = Field(False, description="Treat all classes as one.")
    rect: StrictBool = Field(False, description="Rectangular training batches.")
    amp: StrictBool = Field(True, description="Automatic mixed precision (GPU).")
    cache: Literal[False, "ram", "disk"] = Field(False, description="Cache images in RAM or on disk.")
    val: StrictBool = Field(True, description="Validate every epoch.")
    plots: StrictBool = Field(False, description="Write Ultralytics plots (off by default: needs fonts).")
    save_period: StrictInt = Field(-1, ge=-1, le=10_000,
                                   description="Save a checkpoint every N epochs (-1: only last/best).")

    @field_validator("imgsz")
    @classmethod
    def _multiple_of_32(cls, v: int) -> int:
        if v % 32:
            raise ValueError(f"imgsz must be a multiple of 32, got {v}")
        return v


class JobSpec(BaseModel):
    """What to train: model, dataset, task and Ultralytics arguments."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("", max_length=200, description="Human-readable job name.")
    project: str = Field("default", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Project the job belongs to.")
    pool: str = Field("default", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Runner pool that may run the job.")
    task: Task = Field(Task.detect, description="Ultralytics task.")
    model: str = Field(
        ...,
        min_length=1,
        max_length=1024,
        description="Model YAML (e.g. 'yolov8n.yaml', built from scratch) or a '.pt' weights path on the runner.",
    )
    dataset: str = Field(
        ...,
        min_length=1,
        max_length=2048,
        description="Dataset: a local path (data YAML or a folder with data.yaml / class folders) or s3://bucket/prefix.",
    )
    train: TrainArgs = Field(default_factory=TrainArgs, description="Ultralytics train arguments.")
    timeout_s: StrictInt = Field(24 * 3600, ge=10, le=30 * 24 * 3600, description="Wall-clock limit of one attempt.")
    max_attempts: StrictInt = Field(
        1, ge=1, le=10, description="Attempts before the job is given up: a lost runner or a failure of a class in "
                                    "retry_on starts the next attempt while attempts remain (a runner that shuts down "
                                    "hands its job back as the next attempt whatever this says).")
    retry_on: list[ExitClass] = Field(
        default_factory=lambda: [ExitClass.infrastructure, ExitClass.out_of_memory],
        description="Exit classes of a failed attempt that start the next one (while attempts remain); "
                    "user_error and cancelled never do.")
    retry_backoff_s: StrictFloat = Field(
        30.0, ge=0, le=3600, allow_inf_nan=False,
        description="Wait before retrying a failed attempt: this, doubled for each attempt already made (at most 1 h).")
    dataset_snapshot: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$",
        description="The dataset snapshot (SHA-256 of its manifest) the job must train on: a re-run pins its "
                    "original's, and the runner fails the job when the dataset now resolves to another.")

    @field_validator("retry_on")
    @classmethod
    def _retryable(cls, v: list[ExitClass]) -> list[ExitClass]:
        bad = sorted(c.value for c in set(v) & NEVER_RETRIED)
        if bad:
            raise ValueError(f"{', '.join(bad)} cannot be retried")
        return list(dict.fromkeys(v))

    @field_validator("model")
    @classmethod
    def _model_kind(cls, v: str) -> str:
        if "://" in v or v.startswith("//"):
            raise ValueError("model must be a model YAML name or a path on the runner, "
                             "not a URL (nothing is downloaded)")
        if not v.endswith((".yaml", ".yml", ".pt")):
            raise ValueError("model must be a model YAML (.yaml/.yml) or a weights file (.pt)")
        if "\x00" in v or ".." in v.split("/"):
            raise ValueError("model path must not contain '..' or NUL")
        return v

    @field_validator("dataset")
    @classmethod
    def _dataset_kind(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("dataset is required")
        if "\x00" in v or ".." in v.split("/"):
            raise ValueError("dataset path must not contain '..' or NUL")
        if "://" in v and not v.startswith("s3://"):
            raise ValueError("dataset must be a local path or an s3://bucket/prefix URI")
        if v.startswith("s3://") and len(v) <= len("s3://"):
            raise ValueError("s3 dataset needs a bucket: s3://bucket/prefix")
        return v


class StartJob(BaseModel):
    """Command on ``kiln.cmd.start.<pool>``: run one attempt of a job.  ``Nats-Msg-Id`` is ``<job_id>:<attempt>``."""

    model_config = ConfigDict(extra="ignore")

    v: Literal[1] = Field(SCHEMA_VERSION, description="Schema version of this command.")
    job_id: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,128}$", description="Job id.")
    attempt: int = Field(1, ge=1, description="Attempt number, 1 for the first run.")
    spec: JobSpec = Field(..., description="The job's specification.")
    issued_at: datetime = Field(default_factory=utcnow, description="When the API issued the command.")
    resume_from: str | None = Field(
        None, description="Checkpoint to resume from (a retried attempt): where the artifact store holds the earlier "
                          "attempt's resumable checkpoint (s3:// URI or a path in the runners' artifact folder).")
    resume_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 the fetched checkpoint must have; else the attempt fails.")
    resume_epoch: int | None = Field(
        None, ge=1, description="Last epoch the checkpoint holds (training goes on after it).")
    not_before: datetime | None = Field(
        None, description="A retry after a failure waits until then (its backoff); a runner that gets it earlier "
                          "puts it back until that time.")

    @property
    def subject(self) -> str:
        return subjects.start(self.spec.pool)

    @property
    def msg_id(self) -> str:
        return f"{self.job_id}:{self.attempt}"


class CancelJob(BaseModel):
    """Command on ``kiln.cmd.cancel.<job_id>``: stop the job's running attempt."""

    model_config = ConfigDict(extra="ignore")

    v: Literal[1] = Field(SCHEMA_VERSION, description="Schema version.")
    job_id: str = Field(..., description="Job id.")
    reason: str = Field("cancelled by user", description="Why the job is cancelled.")
