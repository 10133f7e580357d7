# Every target creates .venv on first use and reinstalls when pyproject.toml changes.
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.geomlab-installed
PYTHON ?= python3

.PHONY: demo tune study test bench browser clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test,ray]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m geomlab.train --out runs/demo --resume
	$(PY) -m geomlab.analyze runs/demo

# Each strategy's strength chosen on the validation seeds (100, 101): writes experiments/tuned/shapes_5phase.toml
# (the committed file is the one the study uses). 82 runs: 2 seeds x (the finetune reference + 10 strategies
# x 4 points), each point without fine traces: 41 min 49 s measured on this idle 2-core machine; rerun to resume.
tune: $(STAMP)
	$(PY) -m geomlab.tune experiments/shapes_baselines.toml --out runs/tune --tuned-out experiments/tuned/shapes_5phase.toml

# Every strategy on the test seeds 0-4 with the tuned values: the baseline comparison with confidence
# intervals (60 runs and 5 base models): 29 min 43 s and 30 min 35 s measured on this idle 2-core machine. One job per
# core at a time (a local Ray, one thread a job): geomlab-tiny's GEMMs are too small for two threads to
# share one well (README, "What it costs on one machine").
study: $(STAMP)
	$(PY) -m geomlab.train --config experiments/shapes_baselines.toml --out runs/study --resume \
		--executor ray --cpus-per-run 1
	$(PY) -m geomlab.analyze runs/study

# The report test drives a real headless browser; install Debian's chromium when it is missing.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

test: $(STAMP) browser
	$(PY) -m pytest -q -x -n auto --maxprocesses 4 --dist loadfile --durations=15

bench: $(STAMP)
	$(PY) -m geomlab.bench kernels
	$(PY) -m geomlab.bench train
	$(PY) -m geomlab.bench analyze

clean:
	rm -rf runs .pytest_cache
