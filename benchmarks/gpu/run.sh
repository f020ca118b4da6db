#!/usr/bin/env bash
# One prepared, unattended check of clipforge on a GPU (an H100: 7.5 minutes at most), every figure in
# one JSON record in OUT_DIR. The stages and the record: run.py and README.md beside this file.
#
#   bash benchmarks/gpu/run.sh OUT_DIR                          # on the GPU machine
#   bash benchmarks/gpu/run.sh --wheels .whl OUT_DIR            # install open_clip etc. from wheels first
#   bash benchmarks/gpu/run.sh --device cpu --quick OUT_DIR     # every stage in seconds (the CPU test)
#
# Wheels (fetch_wheels.sh makes the folder) are installed into a temporary folder put on
# PYTHONPATH, never into the interpreter's own packages; without --wheels, ./.whl is used when
# open_clip is not installed. clipforge itself runs from src/ (no installation needed).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEVICE=cuda
QUICK=()
WHEELS=""
OUT=""
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --quick) QUICK=(--quick); shift ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --stages|--jobs|--peak-tflops)
      EXTRA+=("$1"); shift
      while [ $# -gt 1 ] && [ "${1#--}" = "$1" ]; do EXTRA+=("$1"); shift; done ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    -*) echo "run.sh: unknown option $1" >&2; exit 2 ;;
    *) OUT="$1"; shift ;;
  esac
done
[ -n "$OUT" ] || { echo "usage: run.sh [--device cuda|cpu] [--quick] [--wheels DIR] OUT_DIR" >&2; exit 2; }

# The project's virtual environment where there is one (a development machine), else the
# machine's python3 (the GPU machine's holds torch).
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi

# Looked up, not imported: importing open_clip takes seconds.
if [ -z "$WHEELS" ] && [ -d "$ROOT/.whl" ] && \
    ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('open_clip') is None)" 2>/dev/null; then
  WHEELS="$ROOT/.whl"
fi
if [ -n "$WHEELS" ]; then
  compgen -G "$WHEELS/*.whl" >/dev/null || { echo "run.sh: no wheels in $WHEELS (fetch_wheels.sh makes them)" >&2; exit 2; }
  SITE="$(mktemp -d /tmp/clipforge-gpu-site.XXXXXX)"
  trap 'rm -rf "$SITE"' EXIT
  # --no-deps: the folder names every package the machine lacks (fetch_wheels.sh); the rest is there.
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"  # absolute: the run starts from the repository root
cd "$ROOT"
# OUT_DIR first: --stages takes every name that follows it
"$PY" benchmarks/gpu/run.py "$OUT" --device "$DEVICE" "${QUICK[@]}" "${EXTRA[@]}"
