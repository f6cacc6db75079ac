#!/usr/bin/env bash
# Installs every Kiln package (editable) and the test tools into one virtual environment: .venv
# Idempotent: a stamp of the package definitions skips the work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${KILN_VENV:-.venv}
PACKAGES=(libs/contracts libs/observability libs/store libs/trainer_sdk trainers/ultralytics services/api services/runner
          services/metrics-writer services/notifier services/clearml-forwarder libs/client deploy/local)

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.kiln-stamp"
want=$(cat requirements-dev.txt scripts/bootstrap.sh $(printf '%s/pyproject.toml ' "${PACKAGES[@]}") | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "bootstrap: $VENV is up to date"; exit 0
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and pinned: a bare "torch" requirement would pull a multi-GB build from the index.
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  echo "bootstrap: installing torch (takes a minute or two)"
  "$VENV/bin/python" -m pip install -q "torch==${KILN_TORCH_VERSION:-2.14.1}" "torchvision==${KILN_TORCHVISION_VERSION:-0.29.1}"
fi
args=()
for p in "${PACKAGES[@]}"; do args+=(-e "$p"); done
echo "bootstrap: installing Kiln packages and test tools"
"$VENV/bin/python" -m pip install -q "${args[@]}" -r requirements-dev.txt
# `kiln` moved from kiln-local to kiln-client: upgrading an older venv removes kiln-local's copy after kiln-client
# wrote its own, so put it back.
[ -x "$VENV/bin/kiln" ] || "$VENV/bin/python" -m pip install -q --no-deps -e libs/client
echo "$want" > "$stamp"
echo "bootstrap: done ($VENV)"
