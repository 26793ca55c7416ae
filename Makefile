# Two commands on a fresh Debian/Ubuntu machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The suite waits on real processes (buildout, brokers, supervisord) more than it computes:
# two workers halve its time on two cores.
TEST_WORKERS ?= 2
SYSTEM_PACKAGES := git mosquitto haproxy systemd

.PHONY: system venv demo fleet-demo fleet-demo-stop plone-demo plone-demo-stop test lint bench clean

# System packages (git, Mosquitto, HAProxy) when something is missing; needs root or sudo.
system:
	@missing=""; for cmd in git mosquitto haproxy systemd-analyze; do \
	  command -v $$cmd >/dev/null 2>&1 || [ -x /usr/sbin/$$cmd ] || missing="$$missing $$cmd"; done; \
	$(PYTHON) -c 'import ensurepip' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    $(SYSTEM_PACKAGES) python3-venv >/dev/null; \
	  $$SUDO systemctl disable --now mosquitto haproxy >/dev/null 2>&1 || true; \
	fi

$(BIN)/deploy-agent: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

venv: system $(BIN)/deploy-agent

demo: venv
	$(BIN)/python examples/demo.py

fleet-demo: venv
	$(BIN)/python examples/fleet_demo.py

fleet-demo-stop: venv
	$(BIN)/python examples/fleet_demo.py --stop

# Real Plone 6 behind HAProxy; the first run downloads Plone (5 to 15 minutes).
plone-demo: venv
	PYTHONPATH=examples $(BIN)/python examples/plone_demo.py

plone-demo-stop: venv
	PYTHONPATH=examples $(BIN)/python examples/plone_demo.py --stop

test: venv
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/ruff format --check .

bench: venv
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .demo .demo-fleet .plone-demo build *.egg-info
