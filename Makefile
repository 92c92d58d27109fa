# edge-fleet: `make demo` runs the end-to-end story, `make test` runs every check CI runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck unit bench sysdeps clean deb test-install test-fresh

# python3-venv first (a fresh Debian lacks it); a .venv left without pip by an earlier failed
# `python3 -m venv` is made again.
$(STAMP): pyproject.toml
	@bash tools/ensure-system-packages.sh venv
	$(BIN)/python -m pip --version >/dev/null 2>&1 || $(PY) -m venv --clear $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

sysdeps:
	@bash tools/ensure-system-packages.sh

# Stays up until Ctrl-C or SIGTERM, with or without a terminal (docs/demo.md).
demo: sysdeps $(STAMP)
	$(BIN)/python -m demo.run $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

# Two workers, one test file each at a time: most tests wait on brokers, mirrors and subprocesses.
# Files go out in the order tests/conftest.py gives them, the longest first (xdist would otherwise
# hand out the files with the most tests first, and the few that take minutes hold one test each).
# PYTEST_ARGS narrows the run, e.g. PYTEST_ARGS=tests/test_config.py.
unit: sysdeps $(STAMP)
	$(BIN)/pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 $(PYTEST_ARGS)

test: lint typecheck unit

bench: sysdeps $(STAMP)
	$(BIN)/python -m bench.run_all

# The agent and fleet-server .deb packages (self-contained venvs under /opt), into packaging/build/dist.
deb:
	$(PY) packaging/build_deb.py

# Install both packages into a throwaway Debian root and run them there (also part of `make test`).
test-install: deb
	bash packaging/test-install.sh packaging/build/dist

# The README's two commands in a fresh Debian 12 root, as a user with sudo (root only; several
# minutes the first time, so not part of `make test`; docs/packaging.md).
test-fresh:
	bash packaging/test-fresh.sh

clean:
	rm -rf $(VENV) build dist *.egg-info packaging/build
