# One command sets up and runs the tests, one the CPU quickstart; each builds its own virtual environment.
# `make` alone builds that environment: the package installed editable, with its `megatron-qwen` command in .venv/bin.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# torch is installed first and pinned to the CPU build on this project's machines: an unpinned torch
# pulls a multi-GB CUDA build. setup.py only asks for a floor, so the pin here is not replaced.
TORCH ?= torch==2.13.0

$(VENV)/.installed: setup.py Makefile
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q $(TORCH)
	$(PYTHON) -m pip install -q -e '.[test]'
	touch $@

.PHONY: setup test test-fast quickstart
setup: $(VENV)/.installed

test: $(VENV)/.installed
	$(PYTHON) -m pytest -q tests

# The quick tests only: none that starts processes or trains for seconds (the `slow` marker, tests/pytest.ini).
test-fast: $(VENV)/.installed
	$(PYTHON) -m pytest -q -m "not slow" tests

quickstart: $(VENV)/.installed
	bash examples/quickstart_cpu.sh $(PYTHON)
