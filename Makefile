# The two commands of the README: `make demo` (main job) and `make test` (the test suite).
# Both install what they need first (scripts/bootstrap.sh, idempotent).

.PHONY: setup demo test lock

setup:
	./scripts/bootstrap.sh

demo: setup
	.venv/bin/swudi demo --dir .swudi-demo

test: setup
	.venv/bin/python -m pytest

lock:
	uv pip compile pyproject.toml --extra dev --find-links "$$(python3 -m pip config get global.find-links)" -o requirements.lock
