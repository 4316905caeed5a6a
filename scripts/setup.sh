#!/usr/bin/env bash
# Creates .venv holding libtorch 2.13.0 (and pyarrow for the one-time data import).
# Idempotent: a stamp file records a finished setup; a second run returns at once.
#   CPU machines: the lean route, three pinned wheels installed --no-deps with hashes.
#   GPU machines (nvidia-smi lists a device): the full torch==2.13.0 install with its
#   CUDA wheels, so libtorch_cuda.so and its libraries are present.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.setup-done-v1

if [ -f "$STAMP" ]; then exit 0; fi

if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)'; then
  echo "setup: $PYTHON is $("$PYTHON" --version 2>&1); the pinned torch wheel hash is for CPython 3.11." >&2
  echo "setup: run with PYTHON=/path/to/python3.11 make setup" >&2
  exit 1
fi

echo "setup: creating $VENV" >&2
"$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/pip --disable-pip-version-check --quiet"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: GPU found; installing the full torch==2.13.0 with its CUDA libraries" >&2
  $PIP install torch==2.13.0
  $PIP install --no-deps --require-hashes \
    "pyarrow==21.0.0 --hash=sha256:40ebfcb54a4f11bcde86bc586cbd0272bac0d516cfa539c799c2453768477569"
  touch "$VENV/.cuda"
else
  echo "setup: no GPU; installing the lean CPU libtorch (about 20 s, 1.2 GB)" >&2
  $PIP install --no-deps --require-hashes -r scripts/requirements-libtorch-cpu.txt
fi

# A stable path for LIBTORCH, whatever the venv's python directory is called.
purelib=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sfn "$purelib/torch" "$VENV/libtorch"
test -f "$VENV/libtorch/lib/libtorch_cpu.so" || { echo "setup: libtorch_cpu.so missing under $VENV/libtorch/lib" >&2; exit 1; }
touch "$STAMP"
echo "setup: done (LIBTORCH=$VENV/libtorch)" >&2
