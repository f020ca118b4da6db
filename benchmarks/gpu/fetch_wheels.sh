#!/usr/bin/env bash
# Downloads the wheels that run.sh installs on a GPU machine whose Python has torch, torchvision,
# timm, numpy, pillow, safetensors, regex, tqdm, huggingface_hub, pyarrow, scikit-image and pytest
# but not OpenCLIP: open_clip_torch and the two packages it needs beyond those (ftfy, and ftfy's
# wcwidth; clipforge's tokenizer needs ftfy too). One version of each, for CPython 3.12 on x86-64
# Linux (override with PY_VERSION); pure-Python wheels fit any version.
#
#   bash benchmarks/gpu/fetch_wheels.sh          # into ./.whl (ignored by git: never commit wheels)
#   bash benchmarks/gpu/fetch_wheels.sh DIR
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEST="${1:-$ROOT/.whl}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
# The versions the project's tests and benchmarks use; --no-deps, so each one is named.
WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4)

mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$DEST" "${WHEELS[@]}"
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1 && ! git -C "$ROOT" check-ignore -q "$DEST/x.whl"; then
  echo "warning: $DEST is not ignored by git; add it to .gitignore or .git/info/exclude" >&2
fi
ls -l "$DEST"
