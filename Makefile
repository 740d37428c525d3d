# `make test` and `make demo` each build .venv on a fresh machine, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev,tensorboard,wandb]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check cam_monitor tests examples benchmarks
	$(PY) -m ruff format --check cam_monitor tests examples benchmarks

demo: $(STAMP)
	$(PY) examples/dann_shapes.py --demo

clean:
	rm -rf $(VENV) .pytest_cache
