# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint setup bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/regfw demo templates/demo.yaml

# Style and types: ruff (pyflakes, pycodestyle, bugbear, import order, pyupgrade) and mypy, as
# configured in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check regfw plugins tests bench templates
	$(BIN)/mypy

# Tests that install into the environment run alone, after the parallel run.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q -m "not serial"
	$(BIN)/python -m pytest -q -m serial

bench: $(STAMP)
	for f in bench/*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) runs build *.egg-info
