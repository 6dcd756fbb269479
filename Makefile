# The two commands of the README: `make demo` and `make test` (format + lint check, then the
# tests). Both build $(VENV) first.
# `make bench`: the speed benchmark (installs the `bench` extra, PyTorch) → docs/benchmarks.md + .json.
PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= runs/default
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint format bench mutate venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null || { \
	  echo "error: prunebias_jax needs Python >= 3.11, but '$(PYTHON)' is $$($(PYTHON) --version 2>&1 || echo 'not found'); pass PYTHON=python3.11 (or newer)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m prunebias_jax.main --config configs/default.py --workdir $(WORKDIR)

test: lint
	$(PY) -m pytest -q --durations=30 tests

# The format and lint check of `make test` (ruff, configured in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff format --check --diff .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) scripts/benchmark.py --json docs/benchmarks.json --markdown docs/benchmarks.md $(BENCH_ARGS)

# `make mutate`: mutation testing of the core against its fast unit tests (not part of `make
# test`: ~45 min for the default sample of 300 mutants on 2 cores) → docs/mutation.md.
MUTATE_ARGS ?=
mutate: $(STAMP)
	$(PY) -m pip install --quiet -e '.[mutate]'
	$(PY) scripts/mutate.py $(MUTATE_ARGS)

clean:
	rm -rf $(VENV) runs mutants
