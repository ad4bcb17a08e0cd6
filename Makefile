# The two commands a newcomer needs (as root, on Debian 12 / Ubuntu 22.04+):
#   make demo   see the product work
#   make test   lint, type-check and run every test, kernel tests included
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Debian's BCC module is built for the distribution's Python, so the venv
# must come from it and see its site-packages.
SYSTEM_PYTHON ?= /usr/bin/python3
STAMP := $(VENV)/.installed

.PHONY: setup host venv lint typecheck proto proto-check test unit kernel demo bench clean uninstall deb image

setup: host venv

host:
	@scripts/setup-host.sh

$(STAMP): pyproject.toml setup.py sidecar/kernel/_ringbatch.c sidecar/kernel/_records.c sidecar/events/_jsonline.c bpf/include/events.h
	@test -x $(PY) || $(SYSTEM_PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@if [ -x scripts/install-ops-deps.sh ]; then PYTHON=$(PY) scripts/install-ops-deps.sh; fi
	@touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(VENV)/bin/ruff check sidecar tests benchmarks
	$(VENV)/bin/ruff format --check sidecar tests benchmarks

typecheck: venv
	$(VENV)/bin/mypy sidecar

proto: venv
	PYTHON=$(PY) scripts/gen-proto.sh

proto-check: venv
	PYTHON=$(PY) scripts/gen-proto.sh --check

test: setup lint typecheck proto-check
	$(PY) -m pytest -ra tests

unit: venv
	$(PY) -m pytest -q tests/unit

kernel: setup
	$(PY) -m pytest -ra tests/kernel

demo: setup
	$(VENV)/bin/sidecar demo

bench: setup
	$(PY) benchmarks/run.py

# The Debian package and the OCI images made from it (packaging/, README "Installing").
VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml | head -n 1)
DEB := dist/sidecar_$(VERSION)_$(shell dpkg --print-architecture 2>/dev/null).deb
DEB_INPUTS := $(shell find sidecar bpf systemd examples packaging -type f \
	-not -name '*.pyc' -not -name '*.so') pyproject.toml setup.py

$(DEB): $(STAMP) $(DEB_INPUTS)
	PYTHON=$(PY) packaging/build-deb.sh

deb: $(DEB)

image: $(DEB)
	packaging/build-image.sh $(DEB)

uninstall: venv
	$(VENV)/bin/sidecar uninstall

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build/deb build/image dist
