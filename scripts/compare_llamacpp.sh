#!/usr/bin/env bash
# The whole comparison of the project's Llama victim with llama.cpp on SmolLM2-135M
# (make compare-llamacpp; docs/pretrained.md). llama.cpp runs the same weights dequantized
# to F32 by its own quantize function, with an F32 KV cache; this project runs the victim
# file import-model made from the shipped Q4_1 GGUF. Prints, and writes to $OUT/summary.tsv:
#   tokens     every review of data/rt/raw.jsonl and the hand-written hard texts
#              (fixtures/llama/tokenizer-texts.jsonl): texts whose tokens differ
#   logprobs   the 20 texts of fixtures/llama/logprob-texts.jsonl: the largest difference
#   ppl        perplexity on the data folder's test split, both sides (first token of each
#              review not scored), and against llama.cpp on the Q4_1 file itself (which
#              quantizes activations: the difference it makes)
# Needs: make build data/.smollm2-done-v1 and a data folder (make data).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
DATA=${DATA:?DATA=data folder (make data)}
OUT=${OUT:-runs/compare-llamacpp}
GGUF=data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
VICTIM=data/smollm2/victim.safetensors
scripts/setup_llamacpp.sh
PY=.cache/llamacpp-venv/bin/python
REF="$PY scripts/llamacpp_reference.py"
mkdir -p "$OUT"
F32=$OUT/smollm2-f32.gguf
[ -f "$F32" ] || $REF f32 "$GGUF" "$F32" 2>/dev/null
# Every review, then the hard texts, as example records.
$PY - data/rt/raw.jsonl fixtures/llama/tokenizer-texts.jsonl > "$OUT/texts.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1], encoding="utf-8"):
    print(line.strip())
for line in open(sys.argv[2], encoding="utf-8"):
    r = json.loads(line)
    if not r["id"].startswith("t") or int(r["id"][1:]) < 120:
        print(line.strip())
PY
echo "compare_llamacpp: tokens of $(wc -l < "$OUT/texts.jsonl") texts" >&2
$REF tokens "$GGUF" "$OUT/texts.jsonl" 2>/dev/null > "$OUT/tokens-llamacpp.jsonl"
"$BIN/lm-score" --victim "$VICTIM" --tokens-only --texts "$OUT/texts.jsonl" > "$OUT/tokens-ours.jsonl"
echo "compare_llamacpp: log-probabilities of 20 texts" >&2
$REF logprobs "$F32" fixtures/llama/logprob-texts.jsonl 2>/dev/null > "$OUT/logprobs-llamacpp.jsonl"
"$BIN/lm-score" --victim "$VICTIM" --texts fixtures/llama/logprob-texts.jsonl > "$OUT/logprobs-ours.jsonl" 2>/dev/null
echo "compare_llamacpp: perplexity on $DATA/test.jsonl (llama.cpp F32, llama.cpp Q4_1, ours)" >&2
# Each perplexity run writes atomically and is kept: a rerun skips it.
once() { local out=$1; shift; [ -f "$out" ] || { "$@" > "$out.tmp" 2>/dev/null && mv "$out.tmp" "$out"; }; }
once "$OUT/test-llamacpp-f32.jsonl" $REF logprobs "$F32" "$DATA/test.jsonl"
once "$OUT/test-llamacpp-q4.jsonl" $REF logprobs "$GGUF" "$DATA/test.jsonl"
once "$OUT/test-ours.jsonl" "$BIN/lm-score" --victim "$VICTIM" --texts "$DATA/test.jsonl"
$PY - "$OUT" <<'PY' | tee "$OUT/summary.tsv"
import json, math, sys
out = sys.argv[1]
def read(name):
    return [json.loads(l) for l in open(f"{out}/{name}", encoding="utf-8")]
def worst(a, b):
    assert [r["ids"] for r in a] == [r["ids"] for r in b], "tokens differ"
    return max(abs(x - y) for r, s in zip(a, b) for x, y in zip(r["logprobs"], s["logprobs"]))
def ppl(rs):
    lp = [x for r in rs for x in r["logprobs"]]
    return math.exp(-sum(lp) / len(lp)), len(lp)
a, b = read("tokens-llamacpp.jsonl"), read("tokens-ours.jsonl")
bad = [r["id"] for r, s in zip(a, b) if r["ids"] != s["ids"]]
print(f"tokens\t{len(a)} texts\t{len(bad)} differ\t{' '.join(bad[:10])}")
print(f"logprobs\t20 texts, {sum(len(r['logprobs']) for r in read('logprobs-ours.jsonl'))} tokens\tlargest difference {worst(read('logprobs-llamacpp.jsonl'), read('logprobs-ours.jsonl')):.2e}")
ours, f32, q4 = read("test-ours.jsonl"), read("test-llamacpp-f32.jsonl"), read("test-llamacpp-q4.jsonl")
(po, n), (pf, _), (pq, _) = ppl(ours), ppl(f32), ppl(q4)
print(f"ppl\t{len(ours)} test reviews, {n} tokens\tours {po:.4f}\tllama.cpp F32 {pf:.4f}\tllama.cpp Q4_1 {pq:.4f}")
print(f"test logprobs\tlargest difference from llama.cpp F32 {worst(f32, ours):.2e}\tfrom llama.cpp on the Q4_1 file {worst(q4, ours):.2e}")
PY
