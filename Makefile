# The two commands of the README: `make demo` (main job) and `make test` (the test suite).
# Both install what they need first (scripts/bootstrap.sh, idempotent). `make test-services`: the
# services lane (not in `make test`).
# `make lint`: ruff (lint + format check) and mypy, as .ci/run runs them after the tests.

.PHONY: setup demo test test-services lint lock

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

lint: setup
	.venv/bin/ruff check swudi tasks flows deployments && .venv/bin/ruff format --check swudi tasks flows deployments && .venv/bin/mypy swudi tasks flows

lock:
	uv pip compile pyproject.toml --extra dev --find-links "$$(python3 -m pip config get global.find-links)" -o requirements.lock
