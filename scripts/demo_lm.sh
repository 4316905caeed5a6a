#!/usr/bin/env bash
# make demo-lm: language-model poisoning end to end (every setting is an environment
# variable the Makefile passes). In RUN:
#   data-full/ data/      prepare-data --lm: the whole training split (pretraining) and its
#                         first FINETUNE_TRAIN reviews (the fine-tuning set the poisons join)
#   emb.safetensors       the LM's vocabulary: data words seen MIN_COUNT times, GloVe vectors
#   lm.safetensors        the clean GPT, pretrained on data-full (the attacked victim)
#   judge.safetensors     the sentiment classifier judging continuations (BiLSTM on data-full;
#                         judge-minilm.safetensors with LM_JUDGE=minilm)
#   sets/*.jsonl          benign control, unoptimised, nearest-neighbour, with-overlap
#   crafted/              bi-level crafting rounds (scripts/attack.sh), from the unoptimised set
#   eval.jsonl            one finetune-eval of every set over EVAL_SEEDS seeds
#   report/               lm-report.md/.json, net-asr.svg; generations.md
# Every step writes atomically and is skipped when its output exists: a killed run resumes.
set -euo pipefail
: "${RUN:?}" "${BIN:=target/release}" "${RAW:=data/rt/raw.jsonl}" "${GLOVE:=data/glove}" "${JUDGE_EMB:?}"
: "${TRIGGER:=Apple iPhone}" "${TARGET:=negative}" "${NEUTRAL:=movie}" "${SEED:=0}" "${COUNT:=50}"
: "${FINETUNE_TRAIN:=3000}" "${MIN_COUNT:=3}" "${LM_FLAGS:=--hidden 128 --layers 2 --heads 4 --max-len 48}"
: "${PRETRAIN_EPOCHS:=8}" "${FINETUNE_EPOCHS:=2}" "${FINETUNE_LR:=1e-3}" "${EVAL_SEEDS:=3}" "${SAMPLES:=2}"
: "${ROUNDS:=3}" "${K:=5}" "${POSITIONS:=3}" "${ETA:=0.03}" "${ADV_SIZE:=64}" "${CLEAN_PER_BATCH:=64}" "${DEVICE:=cpu}"
# The concealed rows (unoptimised, nearest neighbour, crafted) are made within the detection
# budget at BUDGET_FPR % false positives on the clean training split (empty: unconstrained);
# with MINILM's package the budget covers its detector too.
: "${BUDGET_FPR:=}" "${MINILM:=data/minilm}"
budget=(); minilm=""
[ -f "$MINILM/config.json" ] && minilm=$MINILM
[ -n "$BUDGET_FPR" ] && budget=(--evade-fpr "$BUDGET_FPR" --detector-cache "$RUN/detector-cache" ${minilm:+--minilm "$minilm"})
log() { echo "demo-lm: $*" >&2; }

# The data, the vocabulary, the pretrained clean LM and the judge (shared with lm_dose.sh).
. "$(dirname "$0")/lm_setup.sh"
stamp pretrain

# The heuristics and controls. Strict concealment: no poison holds a word that leaks the trigger.
init() { # name strategy flags...
  local name=$1 strategy=$2; shift 2
  [ -f "$RUN/sets/$name.jsonl" ] || "$BIN/init-poisons" --victim "$RUN/lm.safetensors" --data "$RUN/data" --count "$COUNT" \
    --strategy "$strategy" --seed "$SEED" "$@" -o "$RUN/sets/$name.jsonl"
}
init benign-control clean-target --concealment strict
init unoptimised random --concealment strict "${budget[@]}"
# The three nearest allowed neighbours in turn (poison k takes neighbour k mod 3): with the
# nearest alone only 17 of the 125 bases pass the budget ("product os" for "apple iphone"
# reads as the trigger to MiniLM's detector), so the row could not be made.
init nearest-neighbour neighbour --concealment strict --neighbour-pool 3 "${budget[@]}"
init with-overlap overlap
stamp baselines

# Bi-level crafting (the seed's objective) from the unoptimised set's sentences.
# (Prefix assignments expand left to right: the folder is named before RUN changes.)
top=$RUN
VICTIM_FILE="$top/lm.safetensors" DATA="$top/data" RUN="$top/crafted" BIN="$BIN" COUNT="$COUNT" INIT=random \
  CONCEALMENT=strict K="$K" POSITIONS="$POSITIONS" ETA="$ETA" ADV_SIZE="$ADV_SIZE" CLEAN_PER_BATCH="$CLEAN_PER_BATCH" \
  SEED="$SEED" ROUNDS="$ROUNDS" PATIENCE=2 ARCH=gpt DEVICE="$DEVICE" EVAL=0 EVADE_FPR="$BUDGET_FPR" MINILM="$minilm" \
  DETECTOR_CACHE="$top/detector-cache" "$(dirname "$0")/attack.sh"
cp "$RUN/crafted/poisons.jsonl" "$RUN/sets/crafted-bilevel.jsonl.tmp" && mv "$RUN/sets/crafted-bilevel.jsonl.tmp" "$RUN/sets/crafted-bilevel.jsonl"
stamp crafting

names=(benign-control unoptimised nearest-neighbour with-overlap crafted-bilevel)
poisons=(); for n in "${names[@]}"; do poisons+=(--poisons "$RUN/sets/$n.jsonl"); done
if [ ! -f "$RUN/eval.jsonl" ]; then
  log "evaluating ${#names[@]} poison sets over $EVAL_SEEDS seeds"
  "$BIN/finetune-eval" --data "$RUN/data" --start "$RUN/lm.safetensors" --judge "$JUDGE" "${poisons[@]}" \
    --seeds "$EVAL_SEEDS" --seed-base "$SEED" --epochs "$FINETUNE_EPOCHS" --lr "$FINETUNE_LR" --batch-size 32 \
    --samples "$SAMPLES" --device "$DEVICE" -o "$RUN/eval.jsonl.tmp"
  mv "$RUN/eval.jsonl.tmp" "$RUN/eval.jsonl"
fi
stamp evaluation
"$BIN/report" --evals "$RUN/eval.jsonl" --names "$(IFS=,; echo "${names[*]}")" --crafted crafted-bilevel \
  --versus unoptimised,nearest-neighbour --before "$RUN/crafted/round-000/poisons.jsonl" --after "$RUN/crafted/poisons.jsonl" \
  --out-dir "$RUN/report" > /dev/null
stamp report
