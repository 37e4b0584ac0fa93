# labeldp: two commands do all set-up on a fresh machine.
#   make reproduce   the main job
#   make test        the test suite
# Both create .venv, install torch==2.13.0 there first when the environment has no torch
# (a torch that $(PYTHON) already has, CUDA build or not, is kept: the venv then sees the
# system packages), then the project with its test extras.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv test test-ray lint reproduce data clean-venv

venv: $(STAMP)

# A base interpreter that already has torch (say a CUDA build) lends it to the venv.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) \
		$$($(PYTHON) -c "import torch" 2>/dev/null && echo --system-site-packages)
	$(PY) -m pip install --quiet --upgrade pip
	@# torch first, pinned, and only when absent: an open range would pull the newest
	@# build with several GB of CUDA packages.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: venv
	$(PY) -m ruff check labeldp attacks experiments tests
	$(PY) -m pytest -q -m "not ray"

# The Ray backend's tests (tests/test_ray.py): installs the optional extra labeldp[ray]
# into the venv, starts a local two-CPU cluster on 127.0.0.1 and stops it (CI runs this
# after `make test`).
test-ray: venv
	$(PY) -m pip install --quiet -e ".[dev,ray]"
	$(PY) -m pytest -q -m ray

lint: venv
	$(PY) -m ruff check labeldp attacks experiments tests

# Fashion-MNIST: Debian's package when apt is usable as root, else the official download
# with checksum verification (labeldp data fetch).
data: venv
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1) \
		|| echo "apt-get could not install dataset-fashion-mnist; downloading instead"; \
	fi
	$(VENV)/bin/labeldp data fetch fashion-mnist

# The quick profile (the packaged sweep files labeldp/experiments/fashion_mnist_quick*.toml):
# every method at four ε plus non-private, with canaries, attacks, the table
# (results/fashion_mnist_quick.md) and the figures (paper_figs/), all under the current
# directory. Resumable.
reproduce: data
	$(VENV)/bin/labeldp reproduce --profile quick

clean-venv:
	rm -rf $(VENV)
