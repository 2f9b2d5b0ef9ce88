# Quick start: `make serve` and `make test` work on a fresh machine (they install into .venv first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU wheel pinned for this machine only; pyproject keeps torch as a range.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test serve bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[server,bench,integrations,dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

serve: $(STAMP)
	$(BIN)/ninocast serve --host 127.0.0.1 --port 8000

bench: $(STAMP)
	$(BIN)/ninocast bench engine

clean:
	rm -rf $(VENV) build *.egg-info
