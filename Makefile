# The two set-up commands (README): `make demo` and `make test`. Both create the environment on first use.
SHELL := /bin/bash
VENV = $(shell scripts/env.sh)
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast kafka-up kafka-down clean-cache

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

kafka-up:
	@venv=$$(scripts/env.sh) && $$venv/bin/alignloop kafka up

kafka-down:
	@venv=$$(scripts/env.sh) && $$venv/bin/alignloop kafka down
