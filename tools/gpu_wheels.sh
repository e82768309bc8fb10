#!/usr/bin/env bash
# Fetch the pure-Python (and the few binary) wheels the GPU check needs beyond what a bare
# CUDA machine with its own Python 3.12 and torch has, into .whl/ (git-ignored).
# Versions are this project's (see `.venv/bin/pip freeze`); run on a machine with pip access.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
py=${PYTHON:-python3}
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat[@]}" -d .whl \
  segmentation-models-pytorch==0.6.0 albumentations==2.0.8 albucore==0.0.24 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  stringzilla==5.3.2 simsimd==6.5.16
du -sh .whl
