# The README's commands. `make install` (and everything that needs it) creates .venv when missing and
# installs exactly requirements.lock into it, then this project (editable, no dependency resolution);
# it runs again whenever the lock or pyproject.toml changes (the stamp file tracks that).
# `make lock` refreshes the lock after pyproject.toml changed; `make lock-upgrade` moves every pin to the
# newest release the ranges in pyproject.toml and lock-constraints.txt allow.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python
LOCK := requirements.lock
LOCK_CONSTRAINTS := lock-constraints.txt
# The lock covers the test and dev extras and the editable build's own requirements (setuptools, wheel), so
# nothing is resolved at install time. No index or find-links lines: they belong to the machine, not the lock.
PIP_COMPILE_ARGS := --quiet --extra test --extra dev --build-deps-for editable --strip-extras --allow-unsafe \
	--no-emit-index-url --no-emit-find-links --no-emit-trusted-host --constraint $(LOCK_CONSTRAINTS) \
	--output-file $(LOCK) pyproject.toml

.PHONY: demo test lint install lock lock-upgrade clean

install: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) pip-tools
	@# pip-sync: exactly the lock, removing what an earlier lock had and this one has not
	$(VENV)/bin/pip-sync -q $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@$(PY) -m pip check || { echo "requirements.lock does not satisfy pyproject.toml: run 'make lock'"; exit 1; }
	@touch $(STAMP)

# Only pip-tools is needed to lock, so a stale lock never blocks its own refresh.
$(VENV)/bin/pip-compile:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(if $(wildcard $(LOCK)),-c $(LOCK)) pip-tools

lock: $(VENV)/bin/pip-compile
	$(VENV)/bin/pip-compile $(PIP_COMPILE_ARGS)

lock-upgrade: $(VENV)/bin/pip-compile
	$(VENV)/bin/pip-compile --upgrade $(PIP_COMPILE_ARGS)

demo: $(STAMP)
	$(PY) -m flows.demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
