# `make test` (CI: lint, then every test), `make test-fast` (skips tests marked slow) and
# `make demo` each build .venv on a fresh machine from the lock (constraints.txt), then run.
# `make test-latest` tries the newest versions pyproject.toml allows, in .venv-latest;
# `make lock` writes those into constraints.txt, only once that lane is green.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := constraints.txt
# One install serves every target: the demo's extra is a subset of dev's.
EXTRAS := dev,tensorboard,wandb,demo
LATEST := .venv-latest

.PHONY: test test-fast test-latest lock demo lint bench clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) -e '.[$(EXTRAS)]'
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

# The newest versions pyproject.toml allows (this machine's pip settings, so torch comes from
# the same index as for the lock: pip only, never a tool that downloads torch builds itself).
# Not part of CI: a lane that finds a breaking release before a user does.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[$(EXTRAS)]'
	$(LATEST)/bin/python -m pip freeze --exclude-editable > $(LATEST)/versions.txt
	$(LATEST)/bin/python -m ruff check cam_monitor tests examples benchmarks
	$(LATEST)/bin/python -m ruff format --check cam_monitor tests examples benchmarks
	$(LATEST)/bin/python -m pytest -q

# Refresh the lock: the newest versions, the whole suite on them, and only then the new file.
lock: test-latest
	{ echo "# The lock: every package of the development and demo environments, pinned."; \
	  echo "# Written by \`make lock\` on $$(date -u +%Y-%m-%d) after lint and the whole suite passed"; \
	  echo "# on these versions ($$($(LATEST)/bin/python -c 'import platform as p; print(p.python_implementation(), p.python_version(), p.system(), p.machine())'))."; \
	  echo "# \`make test\`, \`make test-fast\`, \`make demo\` and CI install from it (pip -c)."; \
	  sort -f $(LATEST)/versions.txt; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	@echo "$(LOCK) updated; commit it with the suite green."

# Source-only vs DANN on real digits, three seeds each, then the grouped comparison. The six
# runs go two at a time, each on one torch thread (one per core); logs in demo_runs/<run>.log.
DEMO_RUNS := $(foreach seed,0 1 2,demo_runs/dann_s$(seed)/.done) \
	$(foreach seed,0 1 2,demo_runs/source_only_s$(seed)/.done)
demo: $(STAMP)
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
	rm -rf $(VENV) $(LATEST) .pytest_cache
