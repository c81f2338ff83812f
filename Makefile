# Two entry points for a fresh machine (see README.md):
#   make run    venv + install, then the default pipeline end to end (dvc repro)
#   make test   venv + install, then the test suite
# Everything installs into .venv with pip (pip picks the local torch wheels; uv/poetry would download).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install run test bench clean

$(BIN)/kdcache: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,plots]'
	touch $@

install: $(BIN)/kdcache

run: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@echo; echo "Test-set scores (metrics/evaluate.md; all metrics: .venv/bin/dvc metrics show):"; cat metrics/evaluate.md

test: install
	$(BIN)/pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/reader.py

clean:
	rm -rf data models caches metrics reports
