#!/bin/sh
# `dvc` for this project: DVC runs from its own environment (.venv-dvc, ANTLR 4.9 for
# hydra) while the stages it starts find `srpu` in .venv (ANTLR 4.13 for Dagster).
here=$(cd "$(dirname "$0")" && pwd)
export PATH="$here:$PATH"
export DVC_NO_ANALYTICS=1
exec "$here/../../.venv-dvc/bin/dvc" "$@"
