#!/usr/bin/env bash
# The fine-tuning regimes of the pretrained model side by side (issue 50's table, without
# its poisoning column yet): for each REGIME, one epoch of train-victim --base on the first
# TRAIN reviews of a language-model data folder (one libtorch thread), its wall time,
# tokens per second and peak memory, then the fine-tuned victim's perplexity on the dev
# split (lm-score); the pretrained model's own dev perplexity as the reference row.
# Writes $OUT/regimes.tsv; every step is kept, so a rerun skips what is done.
#   DATA=data/lm-apple REGIMES="top:2 top:6 all" scripts/measure_regimes.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
DATA=${DATA:?DATA=a language-model data folder (prepare-data --lm)}
OUT=${OUT:-runs/regimes}
BASE=${BASE:-data/smollm2/victim.safetensors}
TRAIN=${TRAIN:-3000}
REGIMES=${REGIMES:-top:2 top:6 all}
LR=${LR:-1e-4}
BATCH=${BATCH:-8}
SEED=${SEED:-0}
mkdir -p "$OUT"
head -n "$TRAIN" "$DATA/train.jsonl" > "$OUT/train.jsonl"
tokens=$("$BIN/lm-score" --victim "$BASE" --tokens-only --texts "$OUT/train.jsonl" | python3 -c 'import json,sys; print(sum(len(json.loads(l)["ids"]) for l in sys.stdin))')
ppl() { "$BIN/lm-score" --victim "$1" --texts "$DATA/dev.jsonl" 2>&1 >/dev/null | sed -n 's/.*perplexity \([0-9.]*\).*/\1/p'; }
[ -f "$OUT/pretrained.ppl" ] || ppl "$BASE" > "$OUT/pretrained.ppl"
for regime in $REGIMES; do
  name=${regime/:/}
  if [ ! -f "$OUT/$name.safetensors" ]; then
    /usr/bin/time -f "%e %M" -o "$OUT/$name.time" "$BIN/train-victim" --base "$BASE" --regime "$regime" --epochs 1 \
      --batch-size "$BATCH" --lr "$LR" --seed "$SEED" --train "$OUT/train.jsonl" -o "$OUT/$name.safetensors" 2> "$OUT/$name.log"
  fi
  [ -f "$OUT/$name.ppl" ] || ppl "$OUT/$name.safetensors" > "$OUT/$name.ppl"
done
{
  printf 'regime\tseconds\ttokens/s\tpeak MB\tfile MB\tdev perplexity\n'
  printf 'pretrained\t-\t-\t-\t-\t%s\n' "$(cat "$OUT/pretrained.ppl")"
  for regime in $REGIMES; do
    name=${regime/:/}
    read -r secs kb < "$OUT/$name.time"
    mb=$(( $(stat -c %s "$OUT/$name.safetensors") / 1000000 ))
    printf '%s\t%s\t%.0f\t%d\t%d\t%s\n' "$regime" "$secs" "$(echo "$tokens / $secs" | bc -l)" $((kb / 1024)) "$mb" "$(cat "$OUT/$name.ppl")"
  done
} | tee "$OUT/regimes.tsv"
