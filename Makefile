# The two commands of the README: `make demo` and `make test`. Both set up the environment first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SRPU := $(VENV)/bin/srpu
STAMP := $(VENV)/.srpu-installed
# DVC lives in its own environment: its hydra/omegaconf pin ANTLR 4.9, while Dagster's
# asset-selection parser needs 4.13 (see STACK_NOTES). A shim puts `dvc` on .venv's PATH.
DVC_VENV := .venv-dvc
DVC_STAMP := $(DVC_VENV)/.installed
DVC_VERSION := 3.67.1

export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONDONTWRITEBYTECODE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export DAGSTER_HOME := $(CURDIR)/.dagster_home

.PHONY: setup browser postgres test demo ui mlflow-ui repro lint clean-outputs

# Re-installs only when pyproject.toml changes. torch/torchvision are pinned in pyproject
# (they come from this machine's disk; other versions would download several GB).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

$(DVC_STAMP):
	@test -x $(DVC_VENV)/bin/python || $(PYTHON) -m venv $(DVC_VENV)
	$(DVC_VENV)/bin/pip install --quiet 'dvc==$(DVC_VERSION)'
	@touch $(DVC_STAMP)

$(VENV)/bin/dvc: $(STAMP) $(DVC_STAMP) tools/dvc-shim.sh
	install -m 755 tools/dvc-shim.sh $(VENV)/bin/dvc

$(DAGSTER_HOME)/dagster.yaml: tools/dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp tools/dagster.yaml $(DAGSTER_HOME)/dagster.yaml

setup: $(STAMP) $(VENV)/bin/dvc $(DAGSTER_HOME)/dagster.yaml

# Debian's Chromium for the browser test (never a test tool's own browser download).
browser:
	@command -v chromium >/dev/null || { \
	  echo "installing Debian chromium + chromium-driver for the browser test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends chromium chromium-driver fonts-liberation >/dev/null; } || \
	  echo "could not install chromium (not root?): the browser test will be skipped"

# Debian's PostgreSQL for the test of real servers (MLflow and Dagster storage on it).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  echo "installing Debian postgresql for the real-servers test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends postgresql >/dev/null; } || \
	  echo "could not install postgresql (not root?): its test will be skipped"

test: setup browser postgres
	$(PY) -m pytest -q --durations=15

# The main job on the bundled synthetic demo data, materialised through Dagster in process:
# dataset_index -> trained_model -> evaluation -> (blocking gate) champion_model -> predictions
# Through `dg launch` (Dagster's own log goes to outputs/demo/dagster.log): one line per
# step, a progress bar while a stage trains, then the report.
demo: setup
	@$(SRPU) -q demo-data
	@status=0; $(PY) -m srpu_pipelines.pipeline.demo_run --select '*' || status=$$?; \
	  $(PY) -m srpu_pipelines.pipeline.report; if [ $$status -ne 0 ]; then \
	  echo "the run failed (a failed blocking check keeps the champion): see make ui"; fi; \
	  exit $$status

# Web UIs, on the loopback interface only.
ui: setup
	$(VENV)/bin/dagster dev -h 127.0.0.1 -p 3000 -w workspace.yaml

mlflow-ui: setup
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow server --host 127.0.0.1 \
	  --port 5000 --workers 1 --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db \
	  --default-artifact-root $(CURDIR)/mlruns/artifacts

# The same stages through DVC (serialised: DVC takes a repository lock).
repro: setup
	$(SRPU) demo-data
	$(SRPU) -q stages --write-dvc
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dvc repro

lint: setup
	$(VENV)/bin/ruff check srpu_pipelines tests
	$(VENV)/bin/ruff format --check srpu_pipelines tests

clean-outputs:
	rm -rf outputs
