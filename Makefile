# Two set-up commands on a fresh machine (Python 3.11):
#   make demo   - install spcxr and run the main job on the embedded synthetic set
#   make test   - install spcxr with its test tools and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .

install-test: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'

demo: install
	$(BIN)/spcxr demo

test: install-test
	$(BIN)/python -m pytest -q

lint: install-test
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

bench: install
	$(BIN)/python bench/prepare_throughput.py
	$(BIN)/python bench/pretrain_throughput.py

clean:
	rm -rf demo_out .pytest_cache
