# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint setup bench bench-peers clean

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

# regfw beside torch-uncertainty and BaaL, in an environment of its own: they need torchvision,
# which imports only beside torch 2.14.1 (both on this machine's disk for pip); constraints-peers.txt.
# torch-uncertainty imports `lightning` and `rich` without declaring them, so they are listed too.
# torch-uncertainty imports `lightning` and `rich` without declaring them, so they are installed too.
PEERS := .venv-peers
PEERS_STAMP := $(PEERS)/.installed

$(PEERS_STAMP): pyproject.toml constraints-peers.txt
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/pip install -q -c constraints-peers.txt torch torchvision torch-uncertainty baal lightning rich
	$(PEERS)/bin/pip install -q -c constraints-peers.txt -e .
	touch $(PEERS_STAMP)

bench-peers: $(PEERS_STAMP)
	$(PEERS)/bin/python bench/peers.py

clean:
	rm -rf $(VENV) $(PEERS) runs build *.egg-info
