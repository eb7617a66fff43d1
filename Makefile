# lumbar-ray — the two commands a newcomer needs: `make demo` and `make test`.
# Everything installs into .venv; `make setup` is idempotent (re-runs only when pyproject changes).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lumbar-ray-installed
# Where the demo writes its synthetic data, models and outputs (ignored by git).
DEMO_DIR ?= work/demo
PYTEST_ARGS ?=
BENCH_ARGS ?=
BENCH_NODES_ARGS ?=
BENCH_ACQ_ARGS ?=
BENCH_TRAIN_ARGS ?=

.PHONY: setup demo test test-fast lint-imports bench bench-nodes bench-acquisitions bench-train clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch/torchvision first: the pinned wheels lie on the build machines' disk.
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/lumbar-ray demo --workdir $(DEMO_DIR)

# The layering contracts of pyproject.toml ([tool.importlinter]) first, then the suite.
test: setup lint-imports
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint-imports: setup
	$(BIN)/lint-imports --no-cache

# Without the slow (training/end-to-end) tests.
test-fast: setup lint-imports
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m lumbar_ray.bench.scoring $(BENCH_ARGS)

# Scoring throughput on 1 .. K Ray nodes (a private multi-node cluster on this machine).
bench-nodes: setup
	$(BIN)/python -m lumbar_ray.bench.nodes $(BENCH_NODES_ARGS)

# Issue #15 item 4: realistic holdout vs its simple twin (same models), axial slices before/after.
bench-acquisitions: setup
	$(BIN)/python -m lumbar_ray.bench.acquisitions $(BENCH_ACQ_ARGS)

# Issue #16 item 2: one epoch of every model on N and 10 x N studies; peak memory, examples/s.
bench-train: setup
	$(BIN)/python -m lumbar_ray.bench.training $(BENCH_TRAIN_ARGS)

clean:
	rm -rf work .pytest_cache
