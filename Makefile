# Two commands on a fresh machine: `make run` and `make test`. Both set up .venv first
# and are idempotent (a stamp file records a finished install).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

run: setup
	$(BIN)/pagedserve up

demo: setup
	$(BIN)/pagedserve generate --chat --max-tokens 48 "What is the capital of France?" "Write a haiku about paging."

test: setup
	$(BIN)/python -m pytest -q --durations=25

bench: setup
	$(BIN)/python -m benchmarks.offline_throughput --no-hf

clean:
	rm -rf $(VENV)

# Headless streaming load test against a running gateway (`make run` in another shell, or
# LOADTEST_HOST=http://host:8000); CSV stats land in load_tests/results/ (gitignored).
# Users, spawn rate and duration: LOADTEST_USERS, LOADTEST_SPAWN_RATE, LOADTEST_RUN_TIME.
.PHONY: loadtest
loadtest: setup
	mkdir -p load_tests/results
	$(BIN)/locust -f load_tests/locustfile.py --headless \
		--users "$${LOADTEST_USERS:-4}" --spawn-rate "$${LOADTEST_SPAWN_RATE:-2}" \
		--run-time "$${LOADTEST_RUN_TIME:-30s}" --stop-timeout 60 \
		--host "$${LOADTEST_HOST:-http://127.0.0.1:8000}" --csv load_tests/results/stats
