# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The zoo (tests/zoo/) runs real torchvision and timm models; torchvision needs a newer torch than the main
# environment's, so the zoo has its own environment, pinned by constraints-zoo.txt.
ZOO_VENV := .venv-zoo
ZOO_STAMP := $(ZOO_VENV)/.installed
# The package as a user installs it (tests/installed/): a fresh environment, made anew by every run, holding
# the wheel built from the sdist (both kept in its dist/).
WHEEL_VENV := .venv-wheel
WHEEL_TESTS := REGFW_WHEEL_VENV=$(CURDIR)/$(WHEEL_VENV) $(BIN)/python -m pytest -q tests/installed

.PHONY: demo test test-zoo test-sweep bench-auto test-wheel wheel-env lint docs docs-site setup setup-zoo bench bench-peers bench-uci clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# --no-compile: the 5.5 GB torch build has thousands of modules the zoo never imports; those it
# does import are compiled on first use.
$(ZOO_STAMP): pyproject.toml constraints-zoo.txt
	$(PYTHON) -m venv $(ZOO_VENV)
	$(ZOO_VENV)/bin/pip install -q --no-compile -c constraints-zoo.txt -e . pytest pytest-xdist torchvision timm transformers
	touch $(ZOO_STAMP)

# `python -m build` makes the sdist, then the wheel from the unpacked sdist (so a file missing from the
# sdist fails here); pip installs the wheel into a new environment, pinned like .venv. --no-compile as for
# the zoo: the modules the checks import are compiled on first use. pytest, mypy and ruff are the generated
# plugin's `test` extra, which its tests need (installed here, off the tests' clock).
wheel-env: $(STAMP)
	rm -rf $(WHEEL_VENV)
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(BIN)/python -m build -o $(WHEEL_VENV)/dist .
	$(WHEEL_VENV)/bin/pip install -q --no-compile -c constraints.txt $(WHEEL_VENV)/dist/regfw-*.whl pytest mypy ruff

setup: $(STAMP)

setup-zoo: $(ZOO_STAMP)

demo: $(STAMP)
	$(BIN)/regfw demo templates/demo.yaml

# Style and types: ruff (pyflakes, pycodestyle, bugbear, import order, pyupgrade) and mypy, as
# configured in pyproject.toml; both also check the docs' generator, docs/_hooks/.
lint: $(STAMP)
	$(BIN)/ruff check regfw plugins tests bench templates docs/_hooks setup.py
	$(BIN)/mypy

# The documentation site (mkdocs.yml, docs/): built strictly into site/ (a broken link, anchor or API
# reference fails), then every code example of the pages and the README is run (tests/docs/).
# NO_MKDOCS_2_WARNING: mkdocs-material's notice about its successor, printed on every build.
docs-site: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

docs: docs-site
	$(BIN)/python -m pytest -q tests/docs tests/test_readme.py

# `make test`: ruff and mypy first, then the tests (the docs' examples among them: tests/docs); those that
# install into the environment run alone, after the parallel run; the zoo runs last, in its own environment.
# Three jobs run in the background meanwhile: the zoo environment is built (output in .venv/zoo-setup.log,
# shown if it fails), `make test-wheel` builds the wheel, installs it into a fresh .venv-wheel and checks it
# there (output in .venv/test-wheel.log: its summary is shown, the whole log if it fails), and the docs site
# is built strictly (`make docs-site`, output in .venv/docs-site.log, shown if it fails). Most of their work
# is unpacking files or waiting on one process, which overlaps well with the tests.
test: $(STAMP)
	@$(MAKE) --no-print-directory $(ZOO_STAMP) > $(VENV)/zoo-setup.log 2>&1 & zoo=$$!; \
	$(MAKE) --no-print-directory test-wheel > $(VENV)/test-wheel.log 2>&1 & wheel=$$!; \
	$(MAKE) --no-print-directory docs-site > $(VENV)/docs-site.log 2>&1 & site=$$!; \
	status=0; \
	$(MAKE) --no-print-directory lint \
	&& $(BIN)/python -m pytest -n 2 -q -m "not serial" --ignore=tests/zoo \
	&& $(BIN)/python -m pytest -q -m serial --ignore=tests/zoo || status=$$?; \
	if ! wait $$zoo; then cat $(VENV)/zoo-setup.log; echo "make test: building $(ZOO_VENV) failed" >&2; status=1; \
	elif [ $$status -eq 0 ]; then $(ZOO_VENV)/bin/python -m pytest -n 2 -q tests/zoo || status=$$?; fi; \
	if ! wait $$site; then cat $(VENV)/docs-site.log; echo "make test: the docs site did not build (make docs-site)" >&2; \
	[ $$status -ne 0 ] || status=1; fi; \
	if wait $$wheel; then echo "installed wheel (tests/installed, .venv/test-wheel.log):"; tail -n 1 $(VENV)/test-wheel.log; \
	else cat $(VENV)/test-wheel.log; echo "make test: the installed wheel failed; log above and in $(VENV)/test-wheel.log" >&2; \
	[ $$status -ne 0 ] || status=1; fi; \
	exit $$status

test-zoo: $(ZOO_STAMP)
	$(ZOO_VENV)/bin/python -m pytest -n 2 -q tests/zoo

# The registry sweep (tests/sweep/): one model of every timm family and every torchvision classification,
# segmentation, detection and video builder, random weights, small inputs, every regularizer that applies;
# prints the table of families tried, passed, failing by class and excluded. Cases of one model run on
# one worker (--dist loadgroup), which builds it once. `python -m tests.sweep.families` (zoo environment)
# chooses the models again (tests/sweep/selection.json).
test-sweep: $(ZOO_STAMP)
	$(ZOO_VENV)/bin/python -m pytest -n 2 --dist loadgroup -q tests/sweep

# auto against batched on the zoo's and the sweep's models (CPU time, one call each): bench/auto_vs_batched.py.
bench-auto: $(ZOO_STAMP)
	$(ZOO_VENV)/bin/python bench/auto_vs_batched.py

# The package as a user installs it: a fresh .venv-wheel, then tests/installed/ (`make test` runs this
# in the background).
test-wheel: wheel-env
	$(WHEEL_TESTS)

# Every benchmark of the main environment; bench/peers.py needs the peers' environment (make bench-peers),
# bench/auto_vs_batched.py the zoo's (make bench-auto),
# bench/uci*.py are the UCI benchmark (make bench-uci: about 12 minutes on 2 free cores) and its helpers.
bench: $(STAMP)
	for f in bench/*.py; do case "$$f" in bench/peers.py|bench/uci*.py|bench/auto_vs_batched.py) ;; \
	  *) $(BIN)/python $$f || exit 1;; esac; done

# Gal & Ghahramani's UCI regression table (yacht, energy, concrete, wine-quality-red) through regfw beside a
# plain PyTorch loop: 5 splits each, 4000 epochs, T = 10,000, 2 processes. More: make bench-uci UCI_ARGS="--splits 20"
# (all published splits) or UCI_ARGS="--grid" (the paper's grid search for p and tau).
UCI_ARGS ?=
bench-uci: $(STAMP)
	$(BIN)/python bench/uci.py $(UCI_ARGS)

# regfw beside torch-uncertainty and BaaL, in an environment of its own: they need torchvision,
# which imports only beside torch 2.14.1 (both on this machine's disk for pip); constraints-peers.txt.
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
	rm -rf $(VENV) $(ZOO_VENV) $(WHEEL_VENV) $(PEERS) runs build dist site *.egg-info
