# Two commands for a fresh machine: `make demo` and `make test` (each creates or reuses .venv/).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qatsparse-installed
# torch/torchvision are pinned to the releases served from this workplace's local disk; elsewhere
# any torch >= 2.4 works (see pyproject.toml).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint install clean coverage

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qatsparse fit --config recipes/digits_int8_sparse.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff check qatsparse tests benchmarks scripts

test: $(STAMP) lint
	$(PY) -m pytest -q -ra

# The coverage matrix over torchvision, timm and transformers (hours on 2 CPU cores): results JSON + docs/COVERAGE.md.
coverage: $(STAMP)
	nice -n 10 env PYTHONPATH=. $(PY) benchmarks/coverage.py --fresh

clean:
	rm -rf runs lightning_logs .pytest_cache
