# Two entry points for a fresh machine: `make demo` and `make test` (README).
VENV ?= .venv
PY := $(VENV)/bin/python
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: setup demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/ovseg demo

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The edit loop: everything but the tests marked slow (end-to-end runs, downloads, real training).
test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
