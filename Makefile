# Two entry points for a fresh machine (see README.md):
#   make demo   install into .venv and rewrite the built-in pretrained MiniLM (sparse window, auto-tuned)
#   make test   install into .venv and run the test suite
# For development, `make test-fast` runs every test not marked slow (no tests/models/) in under
# two minutes on 2 cores; `make test` (what CI runs) runs them all.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/attnrewrite: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,demo]'
	# timm for tests/models/test_library_models.py, with the torchvision it imports, off the
	# import path (the registry's torchvision is a CUDA build; see tests/_libraries.py)
	$(BIN)/pip install -q --upgrade --no-deps --target $(VENV)/timm timm==1.0.31 torchvision==0.28.0
	touch $@

install: $(BIN)/attnrewrite

demo: install
	$(BIN)/attnrewrite --variant sparse --set mode=window --set auto=true --tolerance 0.05

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

bench: install
	$(BIN)/python benchmarks/bench_detect_rewrite.py

.PHONY: install demo test test-fast bench
