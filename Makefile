# Two commands do all the set-up: `make demo` (default pretraining) and `make test`
# (`make test-fast`: the quick tier).
# Each creates the virtual environment it needs in .venv and installs into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/demo
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: demo test test-fast ablations fashion-mnist gpu-wheels clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The default dataset: Debian's Fashion-MNIST package where apt and root are available;
# elsewhere the run falls back to a prepared TFDS fashion_mnist.
fashion-mnist:
	@if [ ! -d $(FASHION_MNIST_DIR) ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
	  || echo "note: could not install dataset-fashion-mnist; using TFDS fashion_mnist"; \
	fi

demo: $(VENV)/.runtime fashion-mnist
	$(PY) train.py --config configs/default.py --workdir $(WORKDIR)

# Every sweep in configs/ablations (docs/ablations.md): about an hour on 2 CPU cores.
# Points are shared between sweeps and finished ones are skipped: rerunning resumes.
ABLATIONS ?= baselines seed mask_ratio decoder_depth decoder_width mask_strategy target \
             mask_tokens augmentation
ablations: $(VENV)/.runtime fashion-mnist
	set -e; for s in $(ABLATIONS); do \
	  $(PY) -m mae_jax.sweep configs/ablations/$$s.py --workdir workdirs/ablations; done

# The whole suite (CI). test-fast leaves out the tests marked slow (end-to-end subprocess
# runs, anything over ~10 s) and still exercises every module of mae_jax/.
test: $(VENV)/.test fashion-mnist
	$(PY) -m pytest -q

test-fast: $(VENV)/.test fashion-mnist
	$(PY) -m pytest -q -m "not slow"

# Wheels for a GPU machine without network (Python 3.12): what its image lacks for the
# benchmarks; benchmarks/gpu_targets.py installs them from ./wheels.
gpu-wheels: | $(VENV)/bin/python
	$(PY) -m pip download -q -d wheels --python-version 3.12 --only-binary=:all: --no-deps \
	  ml-collections

clean:
	rm -rf $(VENV) workdirs
