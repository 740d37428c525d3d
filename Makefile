# `make test` (CI: lint, then every test), `make test-fast` (skips tests marked slow) and
# `make demo` each build .venv on a fresh machine, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-fast demo lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev,tensorboard,wandb]'
	touch $(STAMP)

# `lint` is a prerequisite: it finishes (and must pass) before the tests start.
test: lint
	$(PY) -m pytest -q

# Doctests included; the DDP, W&B, subprocess and benchmark smoke tests are left to `make test`.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check cam_monitor tests examples benchmarks
	$(PY) -m ruff format --check cam_monitor tests examples benchmarks

demo: $(STAMP)
	rm -rf demo_runs
	$(PY) examples/dann_shapes.py --log-dir demo_runs/source_only
	$(PY) examples/dann_shapes.py --adapt --log-dir demo_runs/dann
	$(PY) -m cam_monitor.cli compare demo_runs/source_only demo_runs/dann --out demo_runs/report.html
	$(PY) examples/demo_figure.py demo_runs/source_only demo_runs/dann --out demo_runs/localization.png
	@echo "report:      demo_runs/report.html"
	@echo "TensorBoard: $(VENV)/bin/tensorboard --logdir demo_runs"

clean:
	rm -rf $(VENV) .pytest_cache
