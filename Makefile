# The two commands of the README: `make run` and `make test` (each sets up .venv first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[train,test]'
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/python -m model.launch

test: setup
	$(BIN)/python -m pytest -q --durations=15

# Lint and format checks (ruff) and the type checker (mypy), as CI runs them.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Every benchmark at full size (tens of minutes; knn's FAISS anchor wants the [bench] extra):
# each writes bench/results/NAME.json and re-renders its region of bench/RESULTS.md.
BENCHMARKS ?= ingest knn bank_writes quantiles caches memory_path reliability

bench: setup
	for name in $(BENCHMARKS); do $(BIN)/python -m bench $$name || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
