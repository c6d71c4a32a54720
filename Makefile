# difflineage: `make quickstart` trains the default model; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SYSTEM ?= dit
# The CPU build of torch that lies on this machine's disk; installed only when no torch is importable.
TORCH_PIN ?= torch==2.13.0

.PHONY: install install-test quickstart test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null && echo "torch already importable: keeping it" \
		|| $(PY) -m pip install "$(TORCH_PIN)"
	$(PY) -m pip install -e .
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -e ".[test]"
	@touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

quickstart: install
	$(PY) -m difflineage quickstart --system $(SYSTEM)

test: install-test
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
