# mailedge developer entry points. CI runs `make test` (see .ci/run) on a fresh clone.
#
#   make venv    .venv with mailedge installed editable plus the test tools
#   make run     run a node with config/mailedge.toml (dev TLS certificate made on first run)
#   make peers   install the real peer daemons the integration tests start (Debian)
#   make lint    ruff + mypy
#   make test    venv, peers, lint, then pytest
#   make bench   the benchmark (bench/run.sh), once there is one
#   make clean   caches and build output; `make distclean` also drops .venv and var/tls

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
# Without an explicit PYTHON, prefer python3.11, then python3 if it is 3.11 or newer.
ifeq ($(origin PYTHON),file)
PYTHON_CANDIDATES := python3.11 $(PYTHON)
else
PYTHON_CANDIDATES := $(PYTHON)
endif

VENV := .venv
VENV_BIN := $(VENV)/bin
# Touched after a successful install; pip runs again only when pyproject.toml changes.
VENV_STAMP := $(VENV)/.mailedge-install.stamp
TLS_DIR := var/tls
CONFIG := config/mailedge.toml

.PHONY: help venv run dev-cert peers lint test bench clean distclean

help:
	@sed -n 's/^#   //p' $(firstword $(MAKEFILE_LIST))

venv: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml
	@if [[ ! -x $(VENV_BIN)/python ]]; then \
	    py=""; \
	    for candidate in $(PYTHON_CANDIDATES); do \
	        if command -v "$$candidate" >/dev/null 2>&1 && \
	           "$$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; \
	        then py=$$candidate; break; fi; \
	    done; \
	    if [[ -z $$py ]]; then \
	        echo "make venv: no Python >= 3.11 among: $(PYTHON_CANDIDATES) (set PYTHON=...)" >&2; \
	        exit 1; \
	    fi; \
	    echo "make venv: creating $(VENV) with $$(command -v $$py)"; \
	    "$$py" -m venv $(VENV) || { \
	        echo "make venv: '$$py -m venv' failed (Debian: apt-get install python3-venv)" >&2; \
	        rm -rf $(VENV); exit 1; }; \
	fi
	@$(VENV_BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	    echo "make venv: $(VENV) has Python < 3.11; remove it (make distclean)" >&2; exit 1; }
	$(VENV_BIN)/python -m pip install --disable-pip-version-check -q -e '.[test]'
	@touch $@

run: venv dev-cert
	exec $(VENV_BIN)/mailedge run --config $(CONFIG)

# Self-signed certificate for STARTTLS in development (`mailedge dev-cert` keeps an
# existing pair).
dev-cert: venv
	@$(VENV_BIN)/mailedge dev-cert --dir $(TLS_DIR)

peers:
	bash scripts/install-debian-peers.sh

lint: venv
	$(VENV_BIN)/ruff check .
	$(VENV_BIN)/mypy

test: venv peers lint
	$(VENV_BIN)/pytest -q -p no:cacheprovider

bench: venv
	@if [[ -f bench/run.sh ]]; then \
	    exec bash bench/run.sh; \
	else \
	    echo "make bench: not yet (bench/run.sh does not exist)"; \
	fi

clean:
	rm -rf build dist ./*.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(TLS_DIR)
	if [[ -d var ]]; then rmdir --ignore-fail-on-non-empty var; fi
