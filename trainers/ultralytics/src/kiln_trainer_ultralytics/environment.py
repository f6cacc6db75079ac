"""Everything that must happen before ``import ultralytics``: offline mode, a private config folder, a font."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

INTEGRATIONS_OFF = {
    "sync": False, "clearml": False, "wandb": False, "mlflow": False, "comet": False, "neptune": False,
    "dvc": False, "tensorboard": False, "raytune": False,
}
"""Ultralytics settings switched off: Kiln reports through its SDK; their own ClearML hook crashes offline."""


def prepare(job_dir: Path) -> Path:
    """Set the environment Ultralytics reads at import time; returns ``YOLO_CONFIG_DIR``.

    * ``YOLO_OFFLINE=1`` skips online checks, analytics and update checks; ``YOLO_AUTOINSTALL=0`` forbids pip.
    * ``YOLO_CONFIG_DIR`` in the job folder keeps ``settings.json`` out of the home folder (and per attempt).
    * ``check_font("Arial.ttf")`` runs during dataset checks even with ``plots=False`` and would download: any
      TTF at ``$YOLO_CONFIG_DIR/Ultralytics/Arial.ttf`` satisfies it, so matplotlib's DejaVuSans is copied there.
    * ``PYTEST_CURRENT_TEST`` (inherited from a test run) makes Ultralytics behave as if under pytest.
    * ``ULTRALYTICS_SAFE_LOAD=1``: weights load with ``torch.load(weights_only=True)`` and an allow-list of model
      classes (no pickle code runs), and a model YAML's ``activation`` is parsed, not ``eval()``-ed: a ``.pt`` or
      ``.yaml`` model that someone could write (a bucket, a shared folder) cannot run code on the runner.
    """
    config_dir = job_dir / "yolo-config"
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "0"
    os.environ["ULTRALYTICS_SAFE_LOAD"] = "1"
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    os.environ.pop("PYTEST_CURRENT_TEST", None)
    font = config_dir / "Ultralytics" / "Arial.ttf"
    if not font.exists():
        font.parent.mkdir(parents=True, exist_ok=True)
        try:
            import matplotlib

            src = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
            shutil.copyfile(src, font)
        except Exception as exc:  # noqa: BLE001 - without it only plots and dataset checks may try a download
            print(f"kiln: warning: no font for Ultralytics ({exc!r})", flush=True)
    return config_dir


def switch_off_integrations() -> None:
    """Disable the Ultralytics integrations listed in :data:`INTEGRATIONS_OFF` (those this version knows)."""
    from ultralytics.utils import SETTINGS

    SETTINGS.update({k: v for k, v in INTEGRATIONS_OFF.items() if k in SETTINGS})


def versions() -> dict[str, str]:
    """Resolved versions of what a job's result depends on (recorded for reproducibility)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch
    import ultralytics

    def pkg(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "?"

    cuda = torch.version.cuda or "none"
    if torch.cuda.is_available():
        cuda += f" ({torch.cuda.device_count()} x {torch.cuda.get_device_name(0)})"
    return {
        "kiln-trainer-sdk": pkg("kiln-trainer-sdk"), "kiln-trainer-ultralytics": pkg("kiln-trainer-ultralytics"),
        "ultralytics": ultralytics.__version__, "torch": torch.__version__, "cuda": cuda,
    }
