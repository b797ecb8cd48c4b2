#!/usr/bin/env bash
# Install everything swudi needs, idempotently: uv, a .venv with the locked packages (requirements.lock),
# swudi itself (editable), and the Debian packages that ship the benchmark's data.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v uv >/dev/null 2>&1; then
  python3 -m pip install --quiet uv
fi
if [ ! -x .venv/bin/python ]; then
  uv venv --quiet --python "$(command -v python3)" .venv
fi
# The CPU build of torch lies in pip's configured find-links folder on these machines.
links=$(python3 -m pip config get global.find-links 2>/dev/null || true)
VIRTUAL_ENV=.venv uv pip sync --quiet --compile-bytecode ${links:+--find-links "$links"} requirements.lock
VIRTUAL_ENV=.venv uv pip install --quiet --compile-bytecode --no-deps -e .

apt_file=benchmarks/retention/requirements-apt.txt
missing=()
for pkg in $(grep -v '^#' "$apt_file"); do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian data packages: ${missing[*]}" >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "warning: Debian packages missing (benchmark tests will be skipped): ${missing[*]}" >&2
  fi
fi
