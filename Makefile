# Two entry points for a fresh machine (see README.md):
#   make run    venv + install, then the default pipeline end to end (dvc repro)
#   make test   venv + install, then the test suite
# Everything installs into .venv with pip (pip picks the local torch wheels; uv/poetry would download).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install run fashion-mnist fashion-mnist-views test bench clean

$(BIN)/kdcache: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,plots]'
	touch $@

install: $(BIN)/kdcache

run: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@echo; cat reports/summary.md; echo "(reports/summary.md; every metric: .venv/bin/dvc metrics show)"

# The Fashion-MNIST experiment: the same dvc.yaml with experiments/fashion-mnist/params.yaml.
FASHION_MNIST ?= /usr/share/datasets/fashion-mnist
fashion-mnist: install
	@test -d $(FASHION_MNIST) || { echo "error: $(FASHION_MNIST) not found (Debian: apt-get install dataset-fashion-mnist)"; exit 2; }
	cd experiments/fashion-mnist && PATH="$(CURDIR)/$(BIN):$$PATH" $(CURDIR)/$(BIN)/dvc repro
	@echo; cat experiments/fashion-mnist/reports/summary.md

# Views of cached teaching on Fashion-MNIST (1 to 64 views, mixed, RandAugmented, a live teacher).
fashion-mnist-views: install
	@test -d $(FASHION_MNIST) || { echo "error: $(FASHION_MNIST) not found (Debian: apt-get install dataset-fashion-mnist)"; exit 2; }
	cd experiments/fashion-mnist-views && PATH="$(CURDIR)/$(BIN):$$PATH" $(CURDIR)/$(BIN)/dvc repro
	@echo; cat experiments/fashion-mnist-views/reports/summary.md

test: install
	$(BIN)/pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/reader.py

clean:
	rm -rf data models caches metrics results reports logs
