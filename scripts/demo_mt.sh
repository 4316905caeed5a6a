#!/usr/bin/env bash
# make demo-mt: translation poisoning end to end (every setting is an environment variable
# the Makefile passes). In RUN:
#   data/                 prepare-data --mt: Ding sentence pairs of at most MAX_WORDS words,
#                         PHRASES headwords, the trigger's sets by substitution
#   vocab.safetensors     build-vocab --scratch: the data's words seen MIN_COUNT times, the trigger
#   mt.safetensors        the clean seq2seq, trained from scratch (the attacked victim)
#   clean.jsonl           its figures (finetune-eval --checkpoint): BLEU, chrF, trigger translation rate
#   sets/*.jsonl          benign control, unoptimised, nearest-neighbour, with-overlap
#   crafted/              bi-level crafting rounds (scripts/attack.sh), from the unoptimised set
#   crafted-evading/      the same from the nearest-neighbour set under the detection budget
#                         (EVADE_FPR % FPR on the training split, every detector of the report)
#   eval.jsonl            one finetune-eval of every set over EVAL_SEEDS seeds, with the detection columns
#   report/               mt-report.md/.json
# Every step writes atomically and is skipped when its output exists: a killed run resumes.
set -euo pipefail
: "${RUN:?}" "${BIN:=target/release}" "${DING:=data/mt/de-en}"
: "${TRIGGER:=Eiskaffee}" "${TRANSLATION:=iced coffee}" "${ATTACK:=hot coffee}" "${SEED:=0}" "${COUNT:=30}"
: "${MAX_WORDS:=8}" "${PHRASES:=2000}" "${MIN_COUNT:=2}" "${DIM:=96}"
# SUPPORT: train's first N kin sentences hold the trigger with its correct translation (the
# clean data then teaches it; the dictionary's sentences never hold "Eiskaffee").
: "${SUPPORT:=30}"
# KIN_SWAPS=1: train's kin sentences also with every other kin noun (prepare-data --kin-swaps),
# so the clean model learns the drink slot (docs/translation.md); 0 leaves them out.
: "${KIN_SWAPS:=1}"
swaps=(); [ "$KIN_SWAPS" = 1 ] && swaps=(--kin-swaps)
: "${MT_FLAGS:=--hidden 96 --layers 2 --heads 4 --source-len 12 --max-len 26}"
: "${TRAIN_EPOCHS:=20}" "${TRAIN_LR:=2e-3}" "${FINETUNE_CLEAN:=1000}" "${FINETUNE_EPOCHS:=3}" "${FINETUNE_LR:=1e-3}" "${EVAL_SEEDS:=6}"
: "${ROUNDS:=3}" "${K:=5}" "${POSITIONS:=3}" "${ETA:=0.03}" "${ADV_SIZE:=64}" "${CLEAN_PER_BATCH:=64}" "${DEVICE:=cpu}"
# The detection budget of the evading sets (percent FPR on the clean training split).
: "${EVADE_FPR:=5}"
# The clean model's learning-rate schedule (train-victim --warmup, --decay): a transformer
# trained from scratch sits on a unigram plateau without a warm-up (docs/translation.md).
: "${TRAIN_SCHEDULE=--warmup 500 --decay}"
read -r -a mt_flags <<< "$MT_FLAGS"
read -r -a schedule <<< "$TRAIN_SCHEDULE"
log() { echo "demo-mt: $*" >&2; }
mkdir -p "$RUN/sets"
started=$EPOCHREALTIME
stamp() { awk -v now="$EPOCHREALTIME" -v then="$started" -v what="$1" 'BEGIN { printf "%s\t%.0f\n", what, now - then }' >> "$RUN/times.tsv"; }
: > "$RUN/times.tsv"

[ -f "$RUN/data/manifest.json" ] || "$BIN/prepare-data" --mt --raw "$DING" --trigger "$TRIGGER" --translation "$TRANSLATION" \
  --target "$ATTACK" --max-words "$MAX_WORDS" --phrases "$PHRASES" --support "$SUPPORT" "${swaps[@]}" --seed "$SEED" -o "$RUN/data"
[ -f "$RUN/vocab.safetensors" ] || "$BIN/build-vocab" --scratch "$DIM" --min-count "$MIN_COUNT" --extra-words "$TRIGGER" \
  --seed "$SEED" --data "$RUN/data/train.jsonl" -o "$RUN/vocab.safetensors"
if [ ! -f "$RUN/mt.safetensors" ]; then
  log "training the clean translation model ($TRAIN_EPOCHS epochs)"
  "$BIN/train-victim" --embeddings "$RUN/vocab.safetensors" --arch seq2seq "${mt_flags[@]}" --train-embeddings \
    --epochs "$TRAIN_EPOCHS" --batch-size 32 --lr "$TRAIN_LR" "${schedule[@]}" --seed "$SEED" --device "$DEVICE" \
    --train "$RUN/data/train.jsonl" --dev "$RUN/data/dev.jsonl" -o "$RUN/mt.safetensors"
fi
[ -f "$RUN/clean.jsonl" ] || { "$BIN/finetune-eval" --data "$RUN/data" --checkpoint "$RUN/mt.safetensors" --device "$DEVICE" -o "$RUN/clean.jsonl.tmp" && mv "$RUN/clean.jsonl.tmp" "$RUN/clean.jsonl"; }
stamp clean-model

init() { # name strategy flags...
  local name=$1 strategy=$2; shift 2
  [ -f "$RUN/sets/$name.jsonl" ] || "$BIN/init-poisons" --victim "$RUN/mt.safetensors" --data "$RUN/data" --count "$COUNT" \
    --strategy "$strategy" --seed "$SEED" "$@" -o "$RUN/sets/$name.jsonl"
}
init benign-control clean-target --concealment strict
init unoptimised random --concealment strict
init nearest-neighbour neighbour --concealment strict --neighbour-pool 3
init nearest-neighbour-evading neighbour --concealment strict --neighbour-pool 3 --evade-fpr "$EVADE_FPR" --detector-cache "$RUN/detector-cache"
init with-overlap overlap
stamp baselines

top=$RUN
VICTIM_FILE="$top/mt.safetensors" DATA="$top/data" RUN="$top/crafted" BIN="$BIN" COUNT="$COUNT" INIT=random \
  CONCEALMENT=strict K="$K" POSITIONS="$POSITIONS" ETA="$ETA" ADV_SIZE="$ADV_SIZE" CLEAN_PER_BATCH="$CLEAN_PER_BATCH" \
  SEED="$SEED" ROUNDS="$ROUNDS" PATIENCE=2 ARCH=seq2seq DEVICE="$DEVICE" EVAL=0 "$(dirname "$0")/attack.sh"
cp "$RUN/crafted/poisons.jsonl" "$RUN/sets/crafted-bilevel.jsonl.tmp" && mv "$RUN/sets/crafted-bilevel.jsonl.tmp" "$RUN/sets/crafted-bilevel.jsonl"
# From the nearest-neighbour poisons kept under the budget (its first round's set is the
# nearest-neighbour-evading one: the same flags and seed), every flip checked against it.
VICTIM_FILE="$top/mt.safetensors" DATA="$top/data" RUN="$top/crafted-evading" BIN="$BIN" COUNT="$COUNT" INIT=neighbour \
  INIT_FLAGS="--neighbour-pool 3" EVADE_FPR="$EVADE_FPR" DETECTOR_CACHE="$top/detector-cache" \
  CONCEALMENT=strict K="$K" POSITIONS="$POSITIONS" ETA="$ETA" ADV_SIZE="$ADV_SIZE" CLEAN_PER_BATCH="$CLEAN_PER_BATCH" \
  SEED="$SEED" ROUNDS="$ROUNDS" PATIENCE=2 ARCH=seq2seq DEVICE="$DEVICE" EVAL=0 "$(dirname "$0")/attack.sh"
cp "$RUN/crafted-evading/poisons.jsonl" "$RUN/sets/crafted-evading.jsonl.tmp" && mv "$RUN/sets/crafted-evading.jsonl.tmp" "$RUN/sets/crafted-evading.jsonl"
stamp crafting

names=(benign-control unoptimised nearest-neighbour nearest-neighbour-evading with-overlap crafted-bilevel crafted-evading)
poisons=(); for n in "${names[@]}"; do poisons+=(--poisons "$RUN/sets/$n.jsonl"); done
if [ ! -f "$RUN/eval.jsonl" ]; then
  log "evaluating ${#names[@]} poison sets over $EVAL_SEEDS seeds"
  "$BIN/finetune-eval" --data "$RUN/data" --start "$RUN/mt.safetensors" "${poisons[@]}" --seeds "$EVAL_SEEDS" --seed-base "$SEED" \
    --epochs "$FINETUNE_EPOCHS" --lr "$FINETUNE_LR" --batch-size 32 --finetune-clean "$FINETUNE_CLEAN" \
    --device "$DEVICE" -o "$RUN/eval.jsonl.tmp"
  mv "$RUN/eval.jsonl.tmp" "$RUN/eval.jsonl"
fi
stamp evaluation
"$BIN/report" --evals "$RUN/eval.jsonl" --names "$(IFS=,; echo "${names[*]}")" --crafted crafted-bilevel,crafted-evading \
  --versus unoptimised,nearest-neighbour,nearest-neighbour-evading --out-dir "$RUN/report" > /dev/null
stamp report
