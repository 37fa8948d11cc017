# fedumm developer entry points. Every target bootstraps .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONHASHSEED := 0

.PHONY: install demo demo-blip3o test test-fast lint world pretrain pretrain-blip3o clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build of 2.13.0 installs from the local cache.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[nvflare,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedumm run configs/demo.yaml --out runs/demo --overwrite

demo-blip3o: $(STAMP)
	$(VENV)/bin/fedumm run configs/demo_blip3o.yaml --out runs/demo-blip3o --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not integration"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs build .pytest_cache

world: $(STAMP)
	$(VENV)/bin/fedumm data synth --out data/world

pretrain: $(STAMP)
	$(VENV)/bin/fedumm pretrain --data data/world

pretrain-blip3o: $(STAMP)
	$(VENV)/bin/fedumm pretrain --family blip3o --data data/world
