# Two commands on a fresh machine: `make run` and `make test`. Both set up .venv first
# and are idempotent (a stamp file records a finished install).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

run: setup
	$(BIN)/pagedserve generate --chat --max-tokens 48 "What is the capital of France?" "Write a haiku about paging."

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV)
