#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a machine with no network: pick an interpreter whose
# torch sees CUDA, make swudi importable from this checkout, print what was found, run the check.
#
#   bash benchmarks/gpu_check.sh [gpu_check.py options]   e.g. --out $OUT/gpu_check.json
#   bash benchmarks/gpu_check.sh --fetch-wheels           here, where a package index answers (see below)
#
# Interpreter: $SWUDI_PYTHON if set, else the first of .venv/bin/python and python3 whose torch has
# CUDA (with --device cpu: whose torch imports). The project's .venv cannot travel to a lent GPU
# machine (it holds a CPU build of torch, 1.6 GB, for this machine's Python); that machine's python3
# holds a CUDA torch. swudi is imported from this checkout (PYTHONPATH); the pure-Python packages it
# needs that such an image may lack (pydantic and its dependencies, at the versions of
# requirements.lock) are unpacked from the wheels in $WHEELS when the import fails. Fetch them once
# with --fetch-wheels (for CPython $GPU_PYTHON_VERSION, default 3.12) and carry that folder.
# Exit status: the check's (0 all parity checks passed, 1 one failed); 2 no usable interpreter / no CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WHEELS=${SWUDI_GPU_WHEELS:-benchmarks/.cache/gpu-wheels}
PACKAGES='pydantic|pydantic-core|annotated-types|typing-inspection|typing-extensions'

if [ "${1:-}" = "--fetch-wheels" ]; then
  pins=$(grep -E "^($PACKAGES)==" requirements.lock)
  mkdir -p "$WHEELS"
  # shellcheck disable=SC2086  # one argument per pin
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" \
    --python-version "${GPU_PYTHON_VERSION:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    $pins
  echo "wheels in $WHEELS ($(du -sh "$WHEELS" | cut -f1)):"
  ls "$WHEELS"
  exit 0
fi

want_cuda=1
prev=
for arg in "$@"; do
  if [ "$arg" = "--device=cpu" ] || { [ "$prev" = "--device" ] && [ "$arg" = "cpu" ]; }; then want_cuda=0; fi
  prev=$arg
done

# torch's view of CUDA, one line: "<torch version> cuda=<build> available=<True|False>"
probe() { "$1" -c 'import torch; print(torch.__version__, f"cuda={torch.version.cuda}", f"available={torch.cuda.is_available()}")' 2>/dev/null; }

py=
if [ -n "${SWUDI_PYTHON:-}" ]; then
  candidates=("$SWUDI_PYTHON")
else
  candidates=(.venv/bin/python python3)
fi
for candidate in "${candidates[@]}"; do
  command -v "$candidate" >/dev/null 2>&1 || { echo "interpreter $candidate: not found"; continue; }
  found=$(probe "$candidate") || { echo "interpreter $candidate: torch does not import"; continue; }
  echo "interpreter $candidate: torch $found"
  if [ "$want_cuda" = 0 ] || [[ $found == *available=True* ]]; then py=$candidate; break; fi
done
if [ -z "$py" ]; then
  if [ "$want_cuda" = 1 ]; then
    echo "error: no interpreter with a CUDA-enabled torch that sees a GPU (tried: ${candidates[*]});" \
      "set SWUDI_PYTHON, or run with --device cpu" >&2
  else
    echo "error: no interpreter with torch (tried: ${candidates[*]}); set SWUDI_PYTHON" >&2
  fi
  exit 2
fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! "$py" -c 'import swudi' 2>/dev/null; then
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  if [ ${#wheels[@]} -eq 0 ]; then
    "$py" -c 'import swudi' 2>&1 | tail -1 >&2 || true
    echo "error: swudi does not import with $py and $WHEELS holds no wheels;" \
      "run 'bash benchmarks/gpu_check.sh --fetch-wheels' where pip works and carry $WHEELS" >&2
    exit 2
  fi
  site=$(mktemp -d "${TMPDIR:-/tmp}/swudi-gpu-check-site.XXXXXX")
  trap 'rm -rf "$site"' EXIT
  for wheel in "${wheels[@]}"; do
    "$py" -m zipfile -e "$wheel" "$site"  # a wheel is a zip of site-packages entries
  done
  export PYTHONPATH="$ROOT:$site${PYTHONPATH#"$ROOT"}"
  echo "unpacked ${#wheels[@]} wheels from $WHEELS into $site"
  if ! "$py" -c 'import swudi' >/dev/null; then
    echo "error: swudi still does not import with $py (error above)" >&2
    exit 2
  fi
fi

echo "running benchmarks/gpu_check.py with $py ($("$py" -c 'import sys; print(sys.version.split()[0])'))"
export PYTHONUNBUFFERED=1
"$py" benchmarks/gpu_check.py "$@"
