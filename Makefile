# Quick start: `make serve` and `make test` work on a fresh machine (they install into .venv first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU wheel pinned for this machine only; pyproject keeps torch as a range.
TORCH_PIN ?= torch==2.13.0
# The oldest Python the package claims (requires-python >= 3.10), for `make test-py310`.
# The first interpreter that really is 3.10 (a pyenv shim of an unselected version is not).
PY310 ?= $(shell for p in $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.10*/bin/python python3.10; do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null && { command -v $$p; break; }; done)
STAMP := $(VENV)/.installed

.PHONY: install test test-py310 print-py310 serve bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[server,bench,integrations,dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The same suite on Python 3.10, in its own venv (README, Development: what it costs).
test-py310:
	@test -n "$(PY310)" || { echo "no Python 3.10 found: make test-py310 PY310=/path/to/python3.10" >&2; exit 1; }
	$(MAKE) test PY=$(PY310) VENV=.venv-py310

print-py310:
	@echo $(PY310)

serve: $(STAMP)
	$(BIN)/ninocast serve --host 127.0.0.1 --port 8000

bench: $(STAMP)
	$(BIN)/ninocast bench engine

clean:
	rm -rf $(VENV) .venv-py310 build *.egg-info
