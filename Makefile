# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline

.PHONY: setup demo test test-fast lint bench slurm-up slurm-down clean

setup:
	@VENV=$(VENV) scripts/setup.sh

demo: setup
	$(VENV)/bin/communs demo

# Unit + end-to-end tests; Slurm tests run when a cluster can be started here (root + apt), else skip.
# lint-imports first: an import against the one-way house (docs/architecture.md) fails in seconds.
test: setup
	$(VENV)/bin/lint-imports --no-cache --no-logo
	-@scripts/slurm-cluster.sh up
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow and not slurm" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/lint-imports --no-cache --no-logo
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

slurm-up:
	scripts/slurm-cluster.sh up

slurm-down:
	scripts/slurm-cluster.sh down

clean:
	rm -rf runs .pytest_cache
