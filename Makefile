# The two commands a fresh clone needs: `make demo` and `make test`. `make setup` is their shared first step.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cirlab-setup
DEMO_OUT ?= demo_out

.PHONY: setup browser malloc demo demo-quick test clean

setup: $(STAMP)

# torch==2.13.0 first (a CPU build lies on this machine's disk; an unpinned torch would pull a CUDA build),
# then the package with its dev extra. uv installs them (about 25 s here, where pip took over 4 minutes); it takes
# the torch file straight from the disk where it lies there, else pip finds torch==2.13.0 as before, and compiles
# torch to bytecode. This machine's environment sets PYTHONDONTWRITEBYTECODE, so without bytecode each of the
# suite's many processes compiled torch and transformers again on import (18 s against 9 s an import); `make test`
# lets the suite's processes write the bytecode of what they import (the first import of a module compiles it,
# the later ones read it), which replaced compiling whole packages up front (21 s of the install: transformers
# alone has thousands of model files the suite never imports).
TORCH_WHEEL := $(firstword $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl))
UV := $(BIN)/uv pip install --quiet --python $(BIN)/python

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet uv
	$(if $(TORCH_WHEEL),$(UV) --compile-bytecode "$(TORCH_WHEEL)",$(BIN)/pip install --quiet torch==2.13.0)
	$(UV) -e ".[dev]"
	touch $(STAMP)

# Training steps run faster under tcmalloc (src/cirlab/allocator.py): install Debian's when missing (root with
# apt-get); without it cirlab tunes glibc's malloc instead.
malloc:
	@ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 || \
	      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4 >/dev/null; }; }; \
	  else echo "tcmalloc is missing and cannot be installed here: cirlab tunes glibc's malloc instead"; fi; }

demo: setup malloc
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/cirlab demo --out $(DEMO_OUT) --seed 0

demo-quick: setup malloc
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/cirlab demo --quick --out $(DEMO_OUT)-quick --seed 0

# The browser test drives Debian's chromium through Playwright; install it when missing (root with apt-get).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is missing and cannot be installed here: the browser test will be skipped"; fi; }

# Two pytest-xdist workers, one per core, each test file on one worker (its module fixtures built once), files in
# the order tests/conftest.py gives them (xdist would otherwise start with the files that hold the most tests).
test: setup browser malloc
	env -u PYTHONDONTWRITEBYTECODE HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 tests

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(DEMO_OUT)-quick
