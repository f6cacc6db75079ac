"""System metrics while training: CPU, RAM and (when NVML finds GPUs) GPU use, from a background thread.

Every ``interval`` seconds the monitor reports one ``MetricsLogged`` whose ``step`` is the number of seconds since
the run started, with keys:

* ``sys/cpu_percent`` (whole machine), ``sys/ram_used_gb``, ``sys/ram_percent`` (whole machine),
  ``sys/proc_rss_gb`` (this process and its children: data loader workers, DDP workers);
* per GPU visible to the job (``CUDA_VISIBLE_DEVICES`` order, so ``gpu0`` is ``cuda:0``): ``sys/gpu0_util``
  (percent), ``sys/gpu0_mem_used_gb``, ``sys/gpu0_mem_percent``, ``sys/gpu0_temp_c``, ``sys/gpu0_power_w``.

NVML comes from ``nvidia-ml-py`` (``import pynvml``); without it, or without a driver, GPU keys are left out.  Inside
Kiln the monitor is on by default (``KILN_SYSTEM_METRICS_S``, 0 turns it off).  Only one process of a job samples:
the first one to start a monitor marks the environment (``KILN_SYSTEM_METRICS_OWNER``), so DDP workers it spawns
do not report the same machine twice.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

from ._events import Record, start_thread, warn_once

GB = 1024**3
OWNER_ENV = "KILN_SYSTEM_METRICS_OWNER"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_value(job: str) -> str:
    """What :data:`OWNER_ENV` holds in the sampling process of ``job`` (``<job_id>:<attempt>``) and its children."""
    return f"{os.getpid()}:{job}"


def should_monitor(job: str = "") -> bool:
    """False in a process whose parent (or an ancestor) already samples this machine for the same job attempt.

    An owner left in the environment by anything else (another job, a process that did not finish its run) does
    not count: only a live process sampling this very ``job`` does."""
    pid, _, owner_job = (os.environ.get(OWNER_ENV) or "").partition(":")
    return not (pid.isdigit() and int(pid) != os.getpid() and owner_job == job and _pid_alive(int(pid)))


class _Gpus:
    """NVML handles of the GPUs this job sees (``CUDA_VISIBLE_DEVICES``), or none."""

    def __init__(self) -> None:
        self.nvml: Any = None
        self.handles: list[Any] = []
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None and not visible.strip():
            return  # the job was given no GPU
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # noqa: BLE001 - no package, no driver, no GPU: no GPU metrics
            return
        self.nvml = pynvml
        try:
            if visible is None:
                ids: list[str] = [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
            else:
                ids = [v.strip() for v in visible.split(",") if v.strip()]
            for dev in ids:
                if dev.isdigit():
                    self.handles.append(pynvml.nvmlDeviceGetHandleByIndex(int(dev)))
                else:  # GPU-<uuid> or MIG-<uuid>
                    self.handles.append(pynvml.nvmlDeviceGetHandleByUUID(dev))
        except Exception as exc:  # noqa: BLE001
            warn_once("nvml", f"GPU metrics unavailable: {exc!r}")
            self.handles = []

    def sample(self, out: dict[str, float]) -> None:
        nv = self.nvml
        for i, h in enumerate(self.handles):
            for key, read in (
                ("util", lambda h=h: nv.nvmlDeviceGetUtilizationRates(h).gpu),
                ("mem_used_gb", lambda h=h: nv.nvmlDeviceGetMemoryInfo(h).used / GB),
                ("mem_percent", lambda h=h: 100.0 * (m := nv.nvmlDeviceGetMemoryInfo(h)).used / m.total),
                ("temp_c", lambda h=h: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
                ("power_w", lambda h=h: nv.nvmlDeviceGetPowerUsage(h) / 1000.0),
            ):
                try:
                    out[f"sys/gpu{i}_{key}"] = float(read())
                except Exception:  # noqa: BLE001 - some boards do not report every value
                    pass

    def close(self) -> None:
        if self.nvml is not None:
            try:
                self.nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass


def sample_once(proc: Any, gpus: _Gpus | None = None) -> dict[str, float]:
    """One sample of every ``sys/*`` metric (``proc``: a ``psutil.Process``)."""
    import psutil

    vm = psutil.virtual_memory()
    out = {"sys/cpu_percent": float(psutil.cpu_percent(interval=None)),
           "sys/ram_used_gb": (vm.total - vm.available) / GB, "sys/ram_percent": float(vm.percent)}
    rss = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            rss += p.memory_info().rss
        except Exception:  # noqa: BLE001 - a child may exit meanwhile
            pass
    out["sys/proc_rss_gb"] = rss / GB
    if gpus is not None:
        gpus.sample(out)
    return out


class SystemMonitor:
    """Samples :func:`sample_once` every ``interval`` s on a daemon thread and submits ``metrics`` records.

    Args:
        submit: Takes each record (the run's reporter).
        interval: Seconds between samples.
        job: ``<job_id>:<attempt>``, to tell this job's child processes that it samples for them.
    """

    def __init__(self, submit: Callable[[Record], None], interval: float = 5.0, job: str = "") -> None:
        self.submit = submit
        self.job = job
        self.interval = interval
        self.samples = 0
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._main, name="kiln-sdk-system", daemon=True)

    def start(self) -> "SystemMonitor":
        os.environ[OWNER_ENV] = owner_value(self.job)  # inherited by child processes: they leave it to us
        start_thread(self._thread)
        return self

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if os.environ.get(OWNER_ENV) == owner_value(self.job):
            os.environ.pop(OWNER_ENV, None)

    def _main(self) -> None:
        try:
            import psutil

            proc = psutil.Process()
            psutil.cpu_percent(interval=None)  # the first call only sets the reference point
            gpus = _Gpus()
        except Exception as exc:  # noqa: BLE001
            warn_once("system", f"system metrics off: {exc!r}")
            return
        try:
            stopping = False
            while not stopping:
                stopping = self._stop.wait(self.interval)
                if stopping and self.samples:
                    break  # a run shorter than one interval still gets one sample, taken when it stops
                try:
                    metrics = sample_once(proc, gpus)
                except Exception as exc:  # noqa: BLE001
                    warn_once("system-sample", f"system metrics sample failed: {exc!r}")
                    continue
                step = int(time.monotonic() - self._t0)
                self.submit(("metrics", time.time(), {"step": step, "metrics": metrics}))
                self.samples += 1
        finally:
            gpus.close()
