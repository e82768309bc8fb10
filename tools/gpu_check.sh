#!/usr/bin/env bash
# The GPU check on a bare CUDA machine (its own Python and torch, no network): install the
# wheels carried in .whl/ (tools/gpu_wheels.sh), then run the core from source.
#   bash tools/gpu_check.sh [--steps 300 ...]     JSON on stdout (and in $OUT if set)
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
exec python3 -m srpu_pipelines.bench.gpu_check --out "${OUT:-/tmp}/gpu_check.json" "$@"
