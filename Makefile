# Set-up is part of every target: `make demo` and `make test` each work on a fresh clone.
# They create .venv here when it is missing and install everything into it, once.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sgr_d2-installed
# torch/torchvision: the pair known to work together here (CUDA build, runs on CPU too).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
export DETECTRON2_DATASETS ?= $(CURDIR)/datasets
DEMO_OUT ?= output/demo
DEMO_TASK ?= semantic
COMPARE_OUT ?= output/compare
COMPARE_ITERS ?= 1000

.PHONY: install demo compare test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml tools/install_detectron2.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) tools/install_detectron2.py
	$(PY) -m pip install --quiet -e ".[test,deploy,cluster]"
	# panopticapi for PQ, without its numpy<2 pin (datasets/README.md#pq-and-panopticapi)
	$(PY) -m pip install --quiet --no-deps panopticapi-lite==0.2.0
	touch $(STAMP)

# Everything, slow tests included (what CI runs), in TEST_WORKERS processes (pytest-xdist), each
# test file in one of them (the module-scoped fixtures are built once), the longest files first
# (tests/conftest.py: LONGEST_FIRST).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -m "slow or not slow" -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The default fast subset.
test-fast: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) tools/demo_toy.py --task $(DEMO_TASK) --output $(DEMO_OUT)

# Baseline, SGR and the DeepLabV3 control on both toys, seeds 1-3, at the budget where SGR's
# gap is established (tools/compare_sgr.py; its --help for more; docs/evidence.md).
compare: $(STAMP)
	$(PY) tools/compare_sgr.py --iters $(COMPARE_ITERS) --control --output $(COMPARE_OUT)

bench: $(STAMP)
	$(PY) bench/sgr_overhead.py

clean:
	rm -rf $(VENV) output
