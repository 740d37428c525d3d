# `make test` (CI: lint, then every test), `make test-fast` (skips tests marked slow) and
# `make demo` each build .venv on a fresh machine, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo

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

$(DEMO_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[demo]'
	touch $(DEMO_STAMP)

# Source-only vs DANN on real digits, three seeds each, then the grouped comparison. The six
# runs go two at a time, each on one torch thread (one per core); logs in demo_runs/<run>.log.
DEMO_RUNS := $(foreach seed,0 1 2,demo_runs/dann_s$(seed)/.done) \
	$(foreach seed,0 1 2,demo_runs/source_only_s$(seed)/.done)
demo: $(DEMO_STAMP)
	rm -rf demo_runs
	$(MAKE) --no-print-directory -j2 $(DEMO_RUNS)
	@grep -h "target accuracy" demo_runs/*.log
	$(PY) -m cam_monitor.cli compare \
	  --group source_only=demo_runs/source_only_s0,demo_runs/source_only_s1,demo_runs/source_only_s2 \
	  --group dann=demo_runs/dann_s0,demo_runs/dann_s1,demo_runs/dann_s2 \
	  --out demo_runs/report.html
	@echo "report:      demo_runs/report.html"
	@echo "TensorBoard: $(VENV)/bin/tensorboard --logdir demo_runs"

demo_runs/%/.done:
	mkdir -p demo_runs/$*
	OMP_NUM_THREADS=1 $(PY) examples/dann_digits.py --no-progress-bar \
	  $(if $(findstring dann,$*),--adapt) --seed $(lastword $(subst _s, ,$*)) \
	  --log-dir demo_runs/$* > demo_runs/$*.log 2>&1 || { tail -n 20 demo_runs/$*.log; exit 1; }
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache
