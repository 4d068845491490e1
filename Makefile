# The two set-up commands (README): `make demo` and `make test`. Both create the environment on first use.
SHELL := /bin/bash
VENV = $(shell scripts/env.sh)
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast bench bench-quick kafka-up kafka-down clean-cache

venv:
	@scripts/env.sh

# Starts Kafka and serves the bundled model on http://127.0.0.1:3000 (open /ui).
demo:
	@venv=$$(scripts/env.sh) && \
	$$venv/bin/alignloop kafka up && \
	$$venv/bin/alignloop serve --port $${PORT:-3000}

# The whole suite, including the real-broker and served-service integration tests and the marked drills.
# OMP_WAIT_POLICY=PASSIVE: the tests run servers beside the test process; spinning OpenMP threads of one made
# the others up to 9x slower on 2 cores.
test:
	@venv=$$(scripts/env.sh) && \
	cd $(CURDIR) && OMP_WAIT_POLICY=PASSIVE $$venv/bin/python -m pytest -q -rs $(PYTEST_ARGS)

# Everything but the slow drills.
test-fast:
	@venv=$$(scripts/env.sh) && $$venv/bin/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Every `alignloop bench` in turn: bench/results.json and the README's table. HOURS on 2 CPU cores (finetune alone
# about an hour, reward, serving and swap 10-40 minutes each); a failed bench is recorded and makes it exit 1.
bench:
	@echo "make bench: every benchmark at full size; this takes hours on 2 CPU cores" >&2
	@venv=$$(scripts/env.sh) && cd $(CURDIR) && \
	OMP_WAIT_POLICY=PASSIVE $$venv/bin/python -m alignloop bench report --out bench/results.json --readme README.md

# Each bench's --quick variant (CI): shows they still run; figures go to ALIGNLOOP_HOME/bench/results-quick.json,
# never to bench/ or the README. No timing is asserted.
bench-quick:
	@venv=$$(scripts/env.sh) && cd $(CURDIR) && OMP_WAIT_POLICY=PASSIVE $$venv/bin/python -m alignloop bench report --quick

kafka-up:
	@venv=$$(scripts/env.sh) && $$venv/bin/alignloop kafka up

kafka-down:
	@venv=$$(scripts/env.sh) && $$venv/bin/alignloop kafka down
