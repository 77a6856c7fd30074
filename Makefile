# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BASE := $(VENV)/.installed-base
TESTS := $(VENV)/.installed-test

.PHONY: demo test venv clean

# the package and its own requirements: all the demo needs
$(BASE): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(BASE)

# the test extra on top: transformers, open_clip, ONNX, OpenVINO, Quantus, mkdocs, notebooks
$(TESTS): $(BASE)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(TESTS)

venv: $(TESTS)

demo: $(BASE)
	$(VENV)/bin/captum-vit demo --out demo_out

test: $(TESTS)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) demo_out .pytest_cache site
