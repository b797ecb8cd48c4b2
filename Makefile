# The two commands of the README: `make demo` (main job) and `make test` (the test suite).
# Both install what they need first (scripts/bootstrap.sh, idempotent). `make test-services`: the
# services lane; `make test-faults`: the faults lane in full (fault injection, CPU load, full disk, then
# every kill point); `make test-faults-sample`: the sample of it that .ci/run runs. None is in `make test`.
# `make lint`: ruff (lint of everything, format check of the library) and mypy (pyproject's `files`: the
# library, tests and benchmarks), as .ci/run runs them after the tests.

.PHONY: setup demo test test-services test-faults test-faults-sample lint lock

setup:
	./scripts/bootstrap.sh

demo: setup
	.venv/bin/swudi demo --dir .swudi-demo

test: setup
	.venv/bin/python -m pytest

# Real services started as an operator starts them (Prefect server + work pool + worker, Dask
# scheduler + workers on S3): docs/testing.md, "The services lane".
test-services: setup
	.venv/bin/python -m pytest -m services

# The faults lane (docs/testing.md): every test marked `faults`, then every kill point (about 40 min).
test-faults: setup
	.venv/bin/python -m pytest -m faults
	./scripts/kill_point_sweep.sh

# CI's sample of the faults lane: LANE_SAMPLE tests drawn by the day's seed (SWUDI_LANE_SEED overrides).
LANE_SAMPLE ?= 2
test-faults-sample: setup
	.venv/bin/python -m pytest -m faults --lane-sample $(LANE_SAMPLE)

lint: setup
	.venv/bin/ruff check swudi tasks flows deployments tests benchmarks && .venv/bin/ruff format --check swudi tasks flows deployments && .venv/bin/mypy

lock:
	uv pip compile pyproject.toml --extra dev --find-links "$$(python3 -m pip config get global.find-links)" -o requirements.lock
