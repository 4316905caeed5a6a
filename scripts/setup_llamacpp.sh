#!/usr/bin/env bash
# Builds llama.cpp once, through PyPI's llama-cpp-python (pinned and hashed in
# scripts/requirements-llamacpp.txt), in a venv of its own under .cache/: the independent
# implementation that scripts/compare_llamacpp.sh and scripts/make_llama_fixtures.py read
# the Llama checkpoints with. Idempotent (a stamp file); about 8 minutes the first time.
# Its KV cache is asked for in F32 by the scripts (llama.cpp's default is F16).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.cache/llamacpp-venv
STAMP=$VENV/.setup-done-v1
if [ -f "$STAMP" ]; then exit 0; fi
mkdir -p .cache
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
echo "setup_llamacpp: building llama.cpp (llama-cpp-python 0.3.36) in $VENV; about 8 minutes on 2 cores" >&2
# No OpenMP (one thread pool, set per call), no examples, tests or multimodal code: only
# the library the Python bindings load.
CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_OPENMP=OFF" \
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
  "$VENV/bin/pip" --disable-pip-version-check --quiet install --no-deps --require-hashes -r scripts/requirements-llamacpp.txt
"$VENV/bin/python" -c 'import llama_cpp, gguf; print("setup_llamacpp: llama.cpp", llama_cpp.__version__)' >&2
touch "$STAMP"
