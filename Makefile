# Two entry points, each setting up its own environment in .venv on a fresh machine:
#   make demo   compile the example models and print plans, byte savings and output agreement
#   make test   run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: 2.13.0 is the local CPU wheel; anything looser may pull CUDA builds.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

# pytest exits 5 when it collects no tests; that is not a failure of the code under test.
test: $(STAMP)
	$(PY) -m pytest -q; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

bench: $(STAMP)
	$(PY) bench/bench_compile.py

clean:
	rm -rf $(VENV) build *.egg-info
