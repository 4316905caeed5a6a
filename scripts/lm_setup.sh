# Sourced by demo_lm.sh and lm_dose.sh (their settings are in scope): in RUN, the
# language-model data (data-full/ for pretraining, data/ the fine-tuning set the poisons
# join), the vocabulary and the clean GPT pretrained on data-full (or START, a pretrained
# checkpoint, instead of both), and the sentiment judge
# (LM_JUDGE: lstm, the BiLSTM over GloVe, judge.safetensors; minilm, all-MiniLM-L6-v2
# fine-tuned, judge-minilm.safetensors, about 11 min on 2 cores). JUDGE is its file,
# JUDGE_TAG what the evaluation folders append for it.
# Each step is skipped when its output exists. Also what both scripts start with: the LM
# flags as an array, RUN/sets, no half-written outputs, and stamp (RUN/times.tsv).
read -r -a lm_flags <<< "$LM_FLAGS"
mkdir -p "$RUN/sets"
find "$RUN" -maxdepth 2 -name '*.tmp' -prune -exec rm -rf {} +
started=$EPOCHREALTIME
stamp() { awk -v now="$EPOCHREALTIME" -v then="$started" -v what="$1" 'BEGIN { printf "%s\t%.0f\n", what, now - then }' >> "$RUN/times.tsv"; }
: > "$RUN/times.tsv"
for split in full finetune; do
  dir="$RUN/data"; limit=(--max-train "$FINETUNE_TRAIN"); [ "$split" = full ] && { dir="$RUN/data-full"; limit=(); }
  [ -f "$dir/manifest.json" ] || "$BIN/prepare-data" --raw "$RAW" --lm --trigger "$TRIGGER" --target "$TARGET" \
    --neutral "$NEUTRAL" --seed "$SEED" "${limit[@]}" -o "$dir"
done
# START (a pretrained checkpoint, e.g. data/smollm2/victim.safetensors): the attacked LM is
# that model, read through its own tokenizer; no word table, no pretraining here. LM is the
# attacked model's file either way.
if [ -n "${START:-}" ]; then
  LM=$START
else
  LM=$RUN/lm.safetensors
  [ -f "$RUN/emb.safetensors" ] || "$BIN/build-vocab" --words "$GLOVE/words.txt" --vectors "$GLOVE/vectors.npy" --top-n 1 \
    --min-count "$MIN_COUNT" --data "$RUN/data-full/train.jsonl" --extra-words "$TRIGGER" --extra-words "$NEUTRAL" -o "$RUN/emb.safetensors"
  if [ ! -f "$LM" ]; then
    log "pretraining the clean language model ($PRETRAIN_EPOCHS epochs)"
    "$BIN/train-victim" --embeddings "$RUN/emb.safetensors" --arch gpt "${lm_flags[@]}" --epochs "$PRETRAIN_EPOCHS" --batch-size 32 \
      --train "$RUN/data-full/train.jsonl" --dev "$RUN/data-full/dev.jsonl" --seed "$SEED" --device "$DEVICE" -o "$LM"
  fi
fi
case "${LM_JUDGE:=lstm}" in
  lstm) JUDGE=$RUN/judge.safetensors; JUDGE_TAG=""; judge_flags=(--embeddings "$JUDGE_EMB" --arch lstm --epochs 4) ;;
  minilm) JUDGE=$RUN/judge-minilm.safetensors; JUDGE_TAG=-minilm
    judge_flags=(--pretrained "${MINILM:-data/minilm}" --arch minilm --epochs 2 --batch-size 32 --max-len 64) ;;
  *) echo "LM_JUDGE=$LM_JUDGE: the judge is lstm or minilm" >&2; exit 2 ;;
esac
[ -f "$JUDGE" ] || "$BIN/train-victim" "${judge_flags[@]}" \
  --train "$RUN/data-full/train.jsonl" --dev "$RUN/data-full/dev.jsonl" --seed "$SEED" --device "$DEVICE" -o "$JUDGE"

# The judges validated before any poisoned result is read: against the held-out reviews'
# labels and against continuations of the attacked model labelled by hand
# (fixtures/lm-judge/: the small GPT's 50; SmolLM2's 50 and its 120 of the stated-opinion
# control, with START a SmolLM2 checkpoint). LABELLED overrides them.
fixtures="$(dirname "$0")/../fixtures/lm-judge"
if [ -z "${LABELLED:-}" ]; then
  case "${START:-}" in
    "") LABELLED="$fixtures/clean-lm-continuations.jsonl" ;;
    *smollm2*) LABELLED="$fixtures/smollm2-continuations.jsonl $fixtures/smollm2-opinion-control.jsonl" ;;
    *) LABELLED="" ;;
  esac
fi
if [ ! -f "$RUN/judges$JUDGE_TAG.jsonl" ]; then
  for labelled in "$RUN/data/dev.jsonl" $LABELLED; do
    "$BIN/judge" --classifier "$JUDGE" --labelled "$labelled"
  done > "$RUN/judges$JUDGE_TAG.jsonl.tmp"
  mv "$RUN/judges$JUDGE_TAG.jsonl.tmp" "$RUN/judges$JUDGE_TAG.jsonl"
fi
