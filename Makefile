# tokenmill: two commands on a fresh machine, `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	# torch is pinned to the CPU build; an unpinned torch pulls GBs of CUDA wheels.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The OpenAI-compatible server on the bundled demo model, http://127.0.0.1:8000/v1
serve: install
	$(BIN)/tokenmill serve --served-model-name demo --enable-auto-tool-choice --tool-call-parser hermes

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/tokenmill bench throughput

clean:
	rm -rf $(VENV) build *.egg-info
