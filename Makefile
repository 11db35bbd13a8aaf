# `make repro`: set up .venv (if missing or older than the requirements) and run the whole DVC pipeline.
# `make test`:  the same set-up, then the test suite.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# stages run as `python -m stages.<name>`: that python must be the venv's
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONHASHSEED := 0
# pip's local-mirror notices are noise; real errors still fail the build (pipefail).
PIPQ := 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }

.PHONY: setup repro test clean-venv
setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt $(PIPQ)
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt $(PIPQ)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . $(PIPQ)
	$(PY) -c "import torch, sys; sys.exit('a CUDA torch was installed; expected the CPU wheel' if torch.version.cuda else 0)"
	touch $(STAMP)

repro: setup
	$(VENV)/bin/dvc repro

test: setup
	$(PY) -m pytest

clean-venv:
	rm -rf $(VENV)
