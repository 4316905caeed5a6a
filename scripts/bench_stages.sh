#!/usr/bin/env bash
# Wall time and peak memory (max RSS) of every stage of one crafting round on the real data,
# run as `make bench` runs it: the default victim (BiLSTM), 50 poisons from confident bases
# with neighbour substitutes, one bi-level round (5 positions x K=10 = 2,500 exact checks),
# one hardness gradient, and finetune-eval of the result on 2 seeds.
#   BIN    binaries to measure (default target/release; point it at another build to compare)
#   DATA   prepared data folder, EMB embeddings (make data makes both)
#   OUT    scratch folder (default runs/bench-stages); its files are rewritten every run
# Prints a tab-separated table: stage, seconds, kernel seconds, peak RSS in MiB.
set -euo pipefail
: "${BIN:=target/release}" "${DATA:?}" "${EMB:?}" "${OUT:=runs/bench-stages}"
mkdir -p "$OUT"

# Runs a stage and prints its time, kernel time and peak RSS (scripts/measure.py: the stage alone).
measure() { "$(dirname "$0")/measure.py" "$1" -- "${@:2}"; }

printf 'stage\tseconds\tsys_seconds\tpeak_rss_mib\n'
measure train-victim "$BIN/train-victim" --embeddings "$EMB" --train "$DATA/train.jsonl" --arch lstm --seed 0 \
  --device cpu -o "$OUT/victim.safetensors"
measure init-poisons "$BIN/init-poisons" --victim "$OUT/victim.safetensors" --data "$DATA" --count 50 \
  --bases confident --strategy neighbour --seed 0 -o "$OUT/poisons-0.jsonl"
measure rollout-grad "$BIN/rollout-grad" --victim "$OUT/victim.safetensors" --data "$DATA" \
  --poisons "$OUT/poisons-0.jsonl" --device cpu -o "$OUT/grad.safetensors"
measure rank-candidates "$BIN/rank-candidates" --victim "$OUT/victim.safetensors" --data "$DATA" \
  --grad "$OUT/grad.safetensors" -k 10 --positions 5 -o "$OUT/candidates.jsonl"
measure verify-candidates "$BIN/verify-candidates" --victim "$OUT/victim.safetensors" --data "$DATA" \
  --poisons "$OUT/poisons-0.jsonl" --candidates "$OUT/candidates.jsonl" --device cpu -o "$OUT/poisons-1.jsonl"
measure rollout-grad-hardness "$BIN/rollout-grad" --victim "$OUT/victim.safetensors" --data "$DATA" \
  --poisons "$OUT/poisons-0.jsonl" --objective hardness --device cpu -o "$OUT/grad-hardness.safetensors"
measure finetune-eval "$BIN/finetune-eval" --data "$DATA" --embeddings "$EMB" --poisons "$OUT/poisons-1.jsonl" \
  --arch lstm --seeds 2 --device cpu -o "$OUT/eval.jsonl"
