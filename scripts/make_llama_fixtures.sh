#!/usr/bin/env bash
# Regenerates fixtures/llama/ (scripts/make_llama_fixtures.py) with llama.cpp as the
# reference: builds it once (scripts/setup_llamacpp.sh), and needs the reviews
# (data/rt/raw.jsonl) and the SmolLM2 GGUF (data/smollm2/), which make fixtures fetches.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_llamacpp.sh
.cache/llamacpp-venv/bin/python scripts/make_llama_fixtures.py data/rt/raw.jsonl data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
