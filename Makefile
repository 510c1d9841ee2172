# llmtrain — `make train` runs the default job, `make test` the test suite. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The torch build to install when the venv has none. Override for another build, e.g.
#   make TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128" train
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_DISABLE_TELEMETRY ?= 1

.PHONY: train test lint format bench dashboard clean delete-results venv dev

venv: $(VENV)/.installed
dev: $(VENV)/.installed-dev

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q --disable-pip-version-check $(TORCH_SPEC)
	$(PIP) install -q --disable-pip-version-check -e .
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	DS_BUILD_OPS=0 $(PIP) install -q --disable-pip-version-check -e ".[dev,deepspeed]"
	@touch $@

## The main job on the embedded default: tiny GPT-2, this Python's stdlib sources, CPU, a few minutes.
train: venv
	$(PY) -m llmtrain.train $(ARGS)

## Lint + the whole test suite (unit, 2-process distributed over gloo, CLI end-to-end), on TEST_WORKERS
## processes (pytest-xdist; each test module stays on one worker, which shares its runs between its tests); the
## 25 slowest tests are listed at the end, to keep the suite fast.
TEST_WORKERS ?= 2
test: dev
	$(VENV)/bin/ruff check llmtrain hydra_plugins tests bench
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadscope --durations=25 $(ARGS)

lint: dev
	$(VENV)/bin/ruff check llmtrain hydra_plugins tests bench

format: dev
	$(VENV)/bin/ruff format llmtrain hydra_plugins tests bench

## CPU benchmarks; the last line is overhead_ratio=<llmtrain tok/s / bare PyTorch loop tok/s> (bench/overhead.py).
bench: dev
	$(PY) bench/prepare_throughput.py
	$(PY) bench/loader_throughput.py
	$(PY) bench/overhead.py

## TensorBoard over every run under runs/ and multirun/ (prints the URL; Ctrl-C stops it).
dashboard: venv
	$(PY) -m llmtrain.tracking.dashboard $(ARGS)

## Build and cache files only: what you trained (runs/, multirun/) stays.
clean:
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info

## Every training result here: runs/ and multirun/ (checkpoints, exports, metrics) and Hydra's outputs/.
## Lists them and deletes nothing unless CONFIRM=yes:  make delete-results CONFIRM=yes
RESULTS := runs multirun outputs
delete-results:
	@found="$$(for d in $(RESULTS); do [ -e "$$d" ] && echo "$$d"; done)"; \
	if [ -z "$$found" ]; then echo "no results here ($(RESULTS))"; exit 0; fi; \
	du -sh $$found; \
	if [ "$(CONFIRM)" != "yes" ]; then echo "nothing deleted: run 'make delete-results CONFIRM=yes' to delete these"; exit 1; fi; \
	rm -rf $$found && echo "deleted: $$found"
