# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench bench-quick clean

UV ?= $(shell command -v uv 2>/dev/null)
# uv installs in parallel and picks torch wheels for the machine (--torch-backend auto: CPU-only wheels without a GPU).
# Without uv, pip does the same install (USE_UV= forces pip: it honours pip's own settings, e.g. local wheel folders).
USE_UV ?= $(if $(UV),yes,)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if [ -n "$(USE_UV)" ]; then \
	  $(UV) pip install --python $(BIN)/python --torch-backend auto -e ".[dev]"; \
	else \
	  $(BIN)/python -m pip install --quiet -e ".[dev]"; \
	fi
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install aidetect with its dev tools (uv where available, else pip)

demo: setup  ## generate synthetic data, crawl it over loopback, train, evaluate, report (offline, CPU)
	$(BIN)/aidetect demo --workspace demo-workspace

# pytest-xdist processes for `make test` (0: one process, no xdist); docs/testing.md says how tests are shared out.
TEST_WORKERS ?= 2

test: setup  ## the whole test suite (what CI runs), the 20 slowest tests listed; "no tests collected" (exit 5) fails
	$(BIN)/ruff check flows tasks pipeline_lib tests benchmarks
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --durations=20; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

lint: setup
	$(BIN)/ruff check flows tasks pipeline_lib tests benchmarks

bench: setup  ## performance benchmarks, JSON on stdout; fails (after running all) if any fails
	@failed=""; for script in benchmarks/bench_*.py; do \
	  echo "== $$script $(BENCH_ARGS)" >&2; \
	  $(BIN)/python $$script $(BENCH_ARGS) || failed="$$failed $$script"; \
	done; \
	if [ -n "$$failed" ]; then echo "benchmarks that failed:$$failed" >&2; exit 1; fi

bench-quick: setup  ## every benchmark at its tiny --quick size: checks that each runs (tests/test_benchmarks.py too)
	$(MAKE) bench BENCH_ARGS=--quick

clean:
	rm -rf demo-workspace .pytest_cache .ruff_cache
