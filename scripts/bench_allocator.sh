#!/usr/bin/env bash
# glibc's allocator as every binary sets it (freed blocks kept on the heap,
# common::cli::keep_freed_memory) against glibc's default (blocks above its adaptive
# threshold, at most 32 MiB, each a fresh mmap, faulted in and zeroed by the kernel;
# KEEP_FREED_MEMORY=0), side by side in one run, on the
# translation demo's data and victim shape: one epoch of train-victim, a k=3 R=2
# rollout-grad and a k=3 R=2 verification of 6 candidates. Each pair must write the same
# bytes.
#   BIN   binaries (default target/release)   DING  the Ding word list (make data/.mt-done-v1)
#   OUT   scratch folder (default runs/bench-allocator)
# Prints a tab-separated table: stage, allocator, seconds, kernel seconds, peak RSS in MiB,
# and each stage's wall-time ratio default / kept.
set -euo pipefail
: "${BIN:=target/release}" "${DING:=data/mt/de-en}" "${OUT:=runs/bench-allocator}"
mkdir -p "$OUT"

[ -f "$OUT/data/manifest.json" ] || "$BIN/prepare-data" --mt --raw "$DING" --trigger Eiskaffee --translation "iced coffee" \
  --target "hot coffee" --max-words 8 --phrases 2000 --support 20 --seed 0 -o "$OUT/data" 2>/dev/null
[ -f "$OUT/vocab.safetensors" ] || "$BIN/build-vocab" --scratch 96 --min-count 2 --extra-words Eiskaffee --seed 0 \
  --data "$OUT/data/train.jsonl" -o "$OUT/vocab.safetensors" 2>/dev/null

# Runs a command and prints its wall time, kernel (sys) time and peak RSS (scripts/measure.py:
# the command alone). KEEP_FREED_MEMORY=0 makes the
# binaries leave the allocator as glibc has it (a MALLOC_ variable would not: setting any
# of them turns off glibc's adaptive threshold).
measure() { # name allocator command...
  local name=$1 alloc=$2; shift 2
  local env=(); [ "$alloc" = default ] && env=(KEEP_FREED_MEMORY=0)
  "$(dirname "$0")/measure.py" "$name" "$alloc" "${env[@]}" -- "$@"
}
train() { # output
  "$BIN/train-victim" --embeddings "$OUT/vocab.safetensors" --arch seq2seq --hidden 96 --layers 2 --heads 4 --source-len 12 \
    --max-len 26 --train-embeddings --epochs 1 --batch-size 32 --lr 2e-3 --warmup 500 --decay --seed 0 --device cpu \
    --train "$OUT/data/train.jsonl" -o "$1"
}
grad() { # output
  "$BIN/rollout-grad" --victim "$OUT/mt-kept.safetensors" --data "$OUT/data" --poisons "$OUT/poisons.jsonl" --steps 3 \
    --rollouts 2 --eta 0.03 --adv-size 64 --clean-per-batch 64 --seed 0 --device cpu -o "$1"
}
verify() { # output
  "$BIN/verify-candidates" --victim "$OUT/mt-kept.safetensors" --data "$OUT/data" --poisons "$OUT/poisons.jsonl" \
    --candidates "$OUT/candidates.jsonl" --device cpu -o "$1"
}
export -f train grad verify; export BIN OUT

printf 'stage\tallocator\tseconds\tsys_seconds\tpeak_rss_mib\n' > "$OUT/table.tsv"
for alloc in kept default; do
  measure train-victim "$alloc" bash -c "train '$OUT/mt-$alloc.safetensors'" >> "$OUT/table.tsv"
done
"$BIN/init-poisons" --victim "$OUT/mt-kept.safetensors" --data "$OUT/data" --count 30 --strategy random --concealment strict \
  --seed 0 -o "$OUT/poisons.jsonl" 2>/dev/null
for alloc in kept default; do
  measure rollout-grad "$alloc" bash -c "grad '$OUT/grad-$alloc.safetensors'" >> "$OUT/table.tsv"
done
"$BIN/rank-candidates" --victim "$OUT/mt-kept.safetensors" --data "$OUT/data" --grad "$OUT/grad-kept.safetensors" \
  -k 2 --positions 1 2>/dev/null | head -6 > "$OUT/candidates.jsonl"
for alloc in kept default; do
  measure verify-candidates "$alloc" bash -c "verify '$OUT/verified-$alloc.jsonl'" >> "$OUT/table.tsv"
done
cat "$OUT/table.tsv"
for f in mt grad verified; do
  cmp -s "$OUT/$f-kept".* "$OUT/$f-default".* || { echo "bench_allocator: $f differs between the allocators" >&2; exit 1; }
done
awk -F'\t' 'NR > 1 { t[$1 FS $2] = $3; if (!seen[$1]++) order[++n] = $1 }
  END { for (i = 1; i <= n; i++) printf "%s: default / kept wall time %.2f\n", order[i], t[order[i] FS "default"] / t[order[i] FS "kept"] }' "$OUT/table.tsv"
echo "same bytes from both allocators"
