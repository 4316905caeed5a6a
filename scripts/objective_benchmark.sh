#!/usr/bin/env bash
# The objective benchmark (called by `make objective-benchmark`): scores every poison set
# of BENCHMARK (../shared/objective-benchmark: 19 James Bond → positive sets with net ASR
# measured by retraining) with each objective setting of OBJECTIVES, against the demo's
# BiLSTM victim (RUN), and writes OUT/<label>.jsonl (score-poisons) and OUT/table.md
# (report objective-benchmark: Spearman's correlation of −value with net ASR). An
# objective worth crafting with should beat the hardness margin there. A label's scores
# are kept once written, so an interrupted run resumes.
set -euo pipefail
: "${RUN:?}" "${DATA:?}" "${OUT:?}" "${BIN:=target/release}" "${BENCHMARK:=../shared/objective-benchmark}"
# label=flags, one per line (flags as score-poisons takes them).
: "${OBJECTIVES:=hardness=--objective hardness --ensemble $RUN/early-s1.safetensors --ensemble $RUN/early-s2.safetensors
bilevel=--objective bilevel
influence=--objective influence --hessian-examples 2000 --damping 0.001
influence-contrastive=--objective influence --hessian-examples 2000 --damping 0.001 --contrastive}"
mkdir -p "$OUT"
files=()
while IFS= read -r line; do
  [ -n "$line" ] || continue
  label=${line%%=*}; read -r -a flags <<< "${line#*=}"
  files+=("$OUT/$label.jsonl")
  [ -f "$OUT/$label.jsonl" ] && continue
  echo "objective-benchmark: $label (${line#*=})" >&2
  start=$EPOCHREALTIME
  "$BIN/score-poisons" --victim "$RUN/victim.safetensors" --data "$DATA" --label "$label" "${flags[@]}" \
    -o "$OUT/$label.jsonl" "$BENCHMARK"/*.jsonl 2> "$OUT/$label.log" || { cat "$OUT/$label.log" >&2; exit 1; }
  awk -v a="$start" -v b="$EPOCHREALTIME" -v l="$label" 'BEGIN { printf "%s\t%.1f\n", l, b - a }' >> "$OUT/seconds.tsv"
done <<< "$OBJECTIVES"
"$BIN/report" objective-benchmark --benchmark "$BENCHMARK" "${files[@]}" > "$OUT/table.md.tmp"
mv "$OUT/table.md.tmp" "$OUT/table.md"
cat "$OUT/table.md"
