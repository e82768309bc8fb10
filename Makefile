# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SRPU := $(VENV)/bin/srpu
STAMP := $(VENV)/.srpu-installed

export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup test demo lint clean-outputs

# Re-installs only when pyproject.toml changes. torch/torchvision are pinned in pyproject
# (they come from this machine's disk; other versions would download several GB).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check srpu_pipelines tests
	$(VENV)/bin/ruff format --check srpu_pipelines tests

# The main job on the bundled synthetic demo data: data -> index -> train -> evaluate -> predict.
demo: setup
	$(SRPU) demo-data
	$(SRPU) index
	$(SRPU) train
	$(SRPU) evaluate
	$(SRPU) predict

clean-outputs:
	rm -rf outputs
