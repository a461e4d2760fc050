# Two commands set everything up on a fresh Debian/Ubuntu machine with Python 3.11+:
#   make run    - the two-site grid on localhost, seeded with sample studies, until Ctrl-C
#   make test   - the whole test suite against a real local Kafka + Cassandra and real DICOM peers
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DICOMGRID := $(BIN)/dicomgrid

.PHONY: setup system-deps venv jars run test test-unit bench down clean

setup: system-deps venv jars

system-deps:
	@bash deploy/local/system-deps.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "dicomgrid needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,bench]'
	@touch $@

jars: venv
	$(DICOMGRID) infra fetch

run: setup
	$(DICOMGRID) infra up
	$(DICOMGRID) schema apply
	$(DICOMGRID) secrets init
	$(DICOMGRID) up --detach
	$(DICOMGRID) seed
	$(DICOMGRID) up

test: setup
	$(BIN)/pytest

test-unit: venv
	$(BIN)/pytest tests/unit

bench: setup
	$(BIN)/python -m bench

down:
	-$(DICOMGRID) down
	-$(DICOMGRID) infra down

clean: down
	rm -rf .dicomgrid
