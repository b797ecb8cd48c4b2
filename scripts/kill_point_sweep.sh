#!/usr/bin/env bash
# The full kill-point sweep (docs/reliability.md, "Faults"): SIGKILL `swudi merge` after each of its
# storage mutations in turn (plan, decompose, merge, publish, prune), re-run it, and require the
# output to be bit-identical to an uninterrupted run. About 20 s per kill point on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export SWUDI_KILL_SWEEP=1
exec .venv/bin/python -m pytest -m slow -s -p no:cacheprovider tests/test_faults_kill_points.py "$@"
