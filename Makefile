# The README's two commands: `make run` (the pipeline on the sample catalog) and `make test`.
# Both bootstrap .venv from requirements.lock first; nothing else needs installing by hand.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_VERSION := 26.3
OPTIONAL_DATA := .cache/debian/.fetched

.PHONY: run test lint lock clean-artifacts venv serve browser

run: $(STAMP) $(OPTIONAL_DATA)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	$(BIN)/python -m components versions
	@echo "Search the current release: make serve, then open http://127.0.0.1:8000/"

# The search service over the production store's CURRENT release (params: serve).
serve: $(STAMP)
	$(BIN)/python -m components serve

test: $(STAMP) browser
	$(BIN)/python -m pytest

# Debian's chromium and its driver for the search page's browser test, when missing and
# apt-get works (as root); otherwise that one test skips and says why.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    chromium chromium-driver; } >/dev/null 2>&1 \
	  || echo "make: chromium could not be installed here; the browser test will skip"; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check components tests dags infra benchmarks
	$(BIN)/ruff format --check components tests dags infra benchmarks
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_architecture.py tests/test_dvc_stages.py

venv: $(STAMP)

# Create the venv if missing and install exactly the locked versions, then the project.
$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet pip==$(PIP_VERSION)
	$(BIN)/python -m pip install --quiet --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $@

# Optional Debian data (CLDR keywords, Noto font) for a richer sample catalog; never fatal.
$(OPTIONAL_DATA): scripts/fetch_optional_data.sh
	@bash scripts/fetch_optional_data.sh .cache/debian

# Re-resolve every dependency jointly and rewrite the lock (needs the package index).
lock:
	rm -rf .cache/lock-venv
	$(PYTHON) -m venv .cache/lock-venv
	.cache/lock-venv/bin/python -m pip install --quiet pip==$(PIP_VERSION)
	.cache/lock-venv/bin/python -m pip install --quiet -r requirements.in
	{ echo "# Lock file: one joint resolve of requirements.in with pip $(PIP_VERSION) on CPython 3.11, Linux x86_64."; \
	  echo "# Regenerate with: make lock   (never edit by hand)"; \
	  .cache/lock-venv/bin/python -m pip freeze --all --exclude pip | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > requirements.lock

clean-artifacts:
	rm -rf artifacts
