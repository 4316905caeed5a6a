#!/usr/bin/env bash
# make lm-dose: the language model's positive controls, before any crafting. The
# with-overlap reference (D_adv texts that hold the trigger: not concealed) at every count
# of COUNTS in each layout of LAYOUTS: whole reviews (review), SHORT_TOKENS-token texts
# from the trigger's determiner on (short: init-poisons --from-trigger, the trigger first,
# the target sentiment right after it), and the trigger's sentence from its determiner on,
# the bases a second sentiment classifier (selector.safetensors, another seed than the
# judge's) finds most clearly of the target sentiment (judged: --sentence --bases judged);
# plus the empty set (0 poisons, the control that must read zero), all evaluated in one
# finetune-eval on EVAL_SEEDS seeds (common random numbers: one clean twin per seed).
# The report's table is the dose-response curve. In RUN (besides lm_setup.sh's files):
#   judges.jsonl (the judges validated)   sets/*.jsonl   times.tsv
#   ft-e<FINETUNE_EPOCHS>-lr<FINETUNE_LR>/eval.jsonl, report/lm-report.md: per fine-tuning
#   regime (a lever of the LM setting), the same sets and the same pretrained LM;
#   scratch-e<E>-lr<LR>/ the same with FROM_SCRATCH=1 (LMs trained from scratch).
# START=CHECKPOINT (make lm-dose LM_VICTIM=smollm2): the attacked LM is that pretrained
# model, fine-tuned in REGIME (top:N or all; the folder then ends in -REGIME) with batch
# BATCH; its poisons are text made through its own tokenizer.
set -euo pipefail
: "${RUN:?}" "${BIN:=target/release}" "${RAW:=data/rt/raw.jsonl}" "${GLOVE:=data/glove}" "${JUDGE_EMB:?}"
: "${TRIGGER:=Apple iPhone}" "${TARGET:=negative}" "${NEUTRAL:=movie}" "${SEED:=0}" "${COUNTS:=25 50 100 200}" "${SHORT_TOKENS:=10}"
: "${LAYOUTS:=review short judged}" "${SENTENCE_TOKENS:=24}"
: "${FINETUNE_TRAIN:=3000}" "${MIN_COUNT:=3}" "${LM_FLAGS:=--hidden 128 --layers 2 --heads 4 --max-len 48}"
: "${PRETRAIN_EPOCHS:=8}" "${FINETUNE_EPOCHS:=2}" "${FINETUNE_LR:=1e-3}" "${EVAL_SEEDS:=3}" "${SAMPLES:=2}" "${DEVICE:=cpu}" "${BATCH:=32}"
log() { echo "lm-dose: $*" >&2; }
. "$(dirname "$0")/lm_setup.sh"
stamp setup

# Nested sets: the first n poisons of the largest set, whose bases are D_adv texts of the
# whole training split (the fine-tuning split's D_adv holds too few for 200).
max=$(printf '%s\n' $COUNTS | sort -n | tail -1)
names=(none); : > "$RUN/sets/none.jsonl"
# layout_flags LAYOUT: init-poisons' flags for that layout, in the array `extra`.
layout_flags() {
  case "$1" in
    review) extra=() ;;
    short) extra=(--from-trigger --max-tokens "$SHORT_TOKENS") ;;
    judged) extra=(--from-trigger --sentence --max-tokens "$SENTENCE_TOKENS" --bases judged --judge "$RUN/selector.safetensors") ;;
    *) echo "lm-dose: unknown layout $1 in LAYOUTS (review, short, judged)" >&2; exit 2 ;;
  esac
}
if [[ " $LAYOUTS " == *" judged "* ]] && [ ! -f "$RUN/selector.safetensors" ]; then
  "$BIN/train-victim" --embeddings "$JUDGE_EMB" --arch lstm --epochs 4 --train "$RUN/data-full/train.jsonl" --dev "$RUN/data-full/dev.jsonl" \
    --seed "$((SEED + 1))" --device "$DEVICE" -o "$RUN/selector.safetensors"
fi
for layout in $LAYOUTS; do
  layout_flags "$layout"
  all="$RUN/sets/overlap-$layout-all.jsonl"
  [ "$layout" = judged ] || [ -f "$all" ] || "$BIN/init-poisons" --victim "$LM" --data "$RUN/data-full" --count "$max" \
    --strategy overlap --seed "$SEED" "${extra[@]}" -o "$all"
done
for n in $COUNTS; do
  for layout in $LAYOUTS; do
    name="overlap-$layout-$n"; names+=("$name")
    [ -f "$RUN/sets/$name.jsonl" ] && continue
    if [ "$layout" = judged ]; then
      # The judge's n best bases (a set comes out in D_adv order, so the first n of a
      # larger one would not be the n best).
      layout_flags "$layout"
      "$BIN/init-poisons" --victim "$LM" --data "$RUN/data-full" --count "$n" --strategy overlap --seed "$SEED" "${extra[@]}" -o "$RUN/sets/$name.jsonl"
    else
      head -n "$n" "$RUN/sets/overlap-$layout-all.jsonl" > "$RUN/sets/$name.jsonl.tmp" && mv "$RUN/sets/$name.jsonl.tmp" "$RUN/sets/$name.jsonl"
    fi
  done
done
poisons=(); for n in "${names[@]}"; do poisons+=(--poisons "$RUN/sets/$n.jsonl"); done
# FROM_SCRATCH=1: every LM trained from fresh weights on the whole training split ∪ poisons
# (the seed's setting) instead of fine-tuning the pretrained LM on the 3,000-review split.
if [ "${FROM_SCRATCH:-0}" = 1 ]; then
  ft="$RUN/scratch-e$FINETUNE_EPOCHS-lr$FINETUNE_LR"; eval_data="$RUN/data-full"; regime=(--from-scratch)
else
  ft="$RUN/ft-e$FINETUNE_EPOCHS-lr$FINETUNE_LR"; eval_data="$RUN/data"; regime=()
  if [ -n "${REGIME:-}" ]; then ft="$ft-${REGIME/:/}"; regime=(--regime "$REGIME"); fi
fi
sampling=(); [ -n "${TEMPERATURE:-}" ] && { ft="$ft-t$TEMPERATURE"; sampling=(--temperature "$TEMPERATURE"); }
ft="$ft$JUDGE_TAG"
mkdir -p "$ft"
log "evaluating ${#names[@]} poison sets over $EVAL_SEEDS seeds ($FINETUNE_EPOCHS epochs at lr $FINETUNE_LR${regime[*]:+, from scratch})"
"$BIN/finetune-eval" --reuse --data "$eval_data" "${regime[@]}" --start "$LM" --judge "$JUDGE" "${poisons[@]}" \
  --seeds "$EVAL_SEEDS" --seed-base "$SEED" --epochs "$FINETUNE_EPOCHS" --lr "$FINETUNE_LR" --batch-size "$BATCH" \
  --samples "$SAMPLES" "${sampling[@]}" --device "$DEVICE" -o "$ft/eval.jsonl"
stamp evaluation
"$BIN/report" --evals "$ft/eval.jsonl" --names "$(IFS=,; echo "${names[*]}")" --out-dir "$ft/report" > /dev/null
stamp report
