# Two commands on a fresh machine with python3 and make: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.bcc-installed
PYTEST_ARGS ?=

.PHONY: demo test install lint clean slurm-up slurm-down chromium

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/bcc demo --out demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check bcc tests

# the headless browser tests/test_report.py renders the report with (system package; root or sudo)
chromium:
	bash .ci/install-chromium.sh

slurm-up:
	bash slurm/local/start.sh

slurm-down:
	bash slurm/local/stop.sh

clean:
	rm -rf demo runs .pytest_cache build dist
