# The README's two commands: `make run` (the pipeline on the sample catalog) and `make test`.
# Both bootstrap .venv from requirements.lock first; nothing else needs installing by hand.
# `make` alone (or `make help`) lists the targets.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_VERSION := 26.3
OPTIONAL_DATA := .cache/debian/.fetched

.DEFAULT_GOAL := help
.PHONY: help run refresh test lint serve metrics mlflow-ui screenshot gpu-check params-doc plots-template lock venv clean-artifacts browser

help: ## list the targets
	@echo "make <target>   (the first run of any target creates .venv from requirements.lock)"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | awk -F'\t' '{printf "  %-16s %s\n", $$1, $$2}'

run: $(STAMP) $(OPTIONAL_DATA) ## the pipeline on the sample catalog (dvc repro), then the store's versions
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	$(BIN)/python -m components versions
	@echo "Search the current release: make serve, then open http://127.0.0.1:8000/"

refresh: $(STAMP) ## between retrains: embed new and changed listings with the current model, update the index, promote
	$(BIN)/python -m components refresh
	$(BIN)/python -m components versions

serve: $(STAMP) ## the search service and page over the store's CURRENT release (params: serve)
	$(BIN)/python -m components serve

metrics: $(STAMP) ## every metric of the last run, one per line (dvc metrics show: the headline)
	.venv/bin/python scripts/show_metrics.py

mlflow-ui: $(STAMP) ## browse the local MLflow store on http://127.0.0.1:5000/
	$(BIN)/mlflow ui --backend-store-uri sqlite:///artifacts/mlflow.db \
	  --default-artifact-root artifacts/mlartifacts --host 127.0.0.1 --port 5000

test: $(STAMP) browser ## the test suite (installs Debian's chromium for the browser test when root)
	$(BIN)/python -m pytest

# Debian's chromium and its driver for the search page's browser test, when missing and
# apt-get works (as root); otherwise that one test skips and says why (fails with
# REQUIRE_BROWSER_TEST=1, as CI sets it).
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    chromium chromium-driver; } >/dev/null 2>&1 \
	  || echo "make: chromium could not be installed here; the browser test will skip"; \
	fi

lint: $(STAMP) ## ruff check and format check, the layer and DVC-stage checks
	$(BIN)/ruff check components tests dags infra benchmarks scripts
	$(BIN)/ruff format --check components tests dags infra benchmarks scripts
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_architecture.py tests/test_dvc_stages.py

screenshot: $(STAMP) browser ## refresh docs/search-page.png from the browser test
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_service.py -k real_browser
	cp build/screenshots/search-page.png docs/search-page.png

gpu-check: $(STAMP) ## the prepared GPU check's table (benchmarks/gpu.sh; --device cpu here)
	PYTHON=$(BIN)/python benchmarks/gpu.sh $(if $(DEVICE),--device $(DEVICE),)

params-doc: $(STAMP) ## regenerate docs/params.md from the config models
	$(BIN)/python scripts/params_doc.py

venv: $(STAMP) ## create .venv from requirements.lock

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

VEGA_PACKAGES = vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0
plots-template: ## rebuild .dvc/plots.html, DVC's plots page with Vega inline (needs the npm registry)
	rm -rf .cache/vega && mkdir -p .cache/vega
	cd .cache/vega && for pkg in $(VEGA_PACKAGES); do \
	  name=$${pkg%@*}; file=$$(npm pack --silent $$pkg) && mkdir $$name && tar xzf $$file -C $$name; \
	done
	$(PYTHON) scripts/dvc_plots_template.py .cache/vega

lock: ## re-resolve requirements.in jointly into requirements.lock (needs the package index)
	rm -rf .cache/lock-venv
	$(PYTHON) -m venv .cache/lock-venv
	.cache/lock-venv/bin/python -m pip install --quiet pip==$(PIP_VERSION)
	.cache/lock-venv/bin/python -m pip install --quiet -r requirements.in
	{ echo "# Lock file: one joint resolve of requirements.in with pip $(PIP_VERSION) on CPython 3.11, Linux x86_64."; \
	  echo "# Regenerate with: make lock   (never edit by hand)"; \
	  .cache/lock-venv/bin/python -m pip freeze --all --exclude pip | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > requirements.lock

clean-artifacts: ## remove artifacts/ (outputs, caches, the local store, MLflow) but the committed metrics
	rm -rf artifacts
	git checkout -- artifacts/evaluate/metrics.json
