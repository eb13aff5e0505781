# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install data demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (cqkd needs Python 3.11)" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

data:
	@bash scripts/get-fashion-mnist.sh

demo: install data
	$(VENV)/bin/cqkd demo --out runs/demo

test: install
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) build src/*.egg-info
