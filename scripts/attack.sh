#!/usr/bin/env bash
# The iterative poisoning loop (called by `make attack`; every setting is an environment
# variable the Makefile passes). Each round lives in its own folder:
#   RUN/round-NNN/{grad.safetensors,candidates.jsonl,summary.json,poisons.jsonl,seconds.tsv}
# Every file is written atomically (by the stage that makes it, or here through a .tmp
# file and mv), and a stage whose output exists is skipped, so a run killed at any moment
# resumes where it stopped and, with the same seed, reaches the same poisons
# (tests/resume.rs checks this). Stops after ROUNDS rounds, when the objective <= TARGET_LADV, or
# after PATIENCE rounds without an accepted flip; then finetune-eval evaluates the result.
set -euo pipefail
: "${RUN:?}" "${VICTIM_FILE:?}" "${DATA:?}" "${EMB:=}" "${BIN:=target/release}"
: "${COUNT:=50}" "${INIT:=random}" "${K:=10}" "${POSITIONS:=5}" "${STEPS:=1}" "${ROLLOUTS:=1}"
: "${ETA:=0.03}" "${CLEAN_PER_BATCH:=64}" "${ADV_SIZE:=128}" "${SEED:=0}" "${ROUNDS:=5}"
: "${PATIENCE:=2}" "${TARGET_LADV:=}" "${OVERLAP:=0}" "${EVAL_SEEDS:=3}" "${ARCH:=lstm}" "${DEVICE:=auto}"
: "${CLEAN_CACHE:=}"
# WORKERS: threads of verify-candidates' checks and finetune-eval's victims (default: the
# cores; a sweep's cells on `make -j` share them out). The poisons are the same bytes whatever it is.
: "${WORKERS:=}"
# Objective (bilevel: the seed's; hardness: FINDINGS.md; influence: implicit differentiation)
# and its extra victims (space-separated paths), its own rollout-grad flags (OBJECTIVE_FLAGS,
# e.g. "--damping 0.1 --contrastive"), base sentences (random|confident), extra
# rank-candidates flags, and EVAL=0 to skip the evaluation (the demo evaluates every variant
# together).
: "${OBJECTIVE:=bilevel}" "${ENSEMBLE:=}" "${OBJECTIVE_FLAGS:=}" "${BASES:=random}" "${RANK_FLAGS:=}" "${EVAL:=1}"
# Extra init-poisons flags.
: "${INIT_FLAGS:=}"
# The detection budget (percent FPR; empty: none): no poison is flagged by a cheap detector
# at that rate on the clean training split (init-poisons and verify-candidates; the ranking
# never proposes the words the GloVe word detector flags). MINILM adds MiniLM's detector,
# DETECTOR_CACHE keeps its scores of the training split.
: "${EVADE_FPR:=}" "${MINILM:=}" "${DETECTOR_CACHE:=}"
# Concealment of the no-overlap poisons: token (no trigger word) or strict (no word that
# leaks the trigger in any category of the strict audit; init, ranking and verification).
: "${CONCEALMENT:=token}"
# A pretrained checkpoint's fine-tuning regime in the unrolled steps (top:N or all; empty:
# the victim file's own), e.g. REGIME=top:2 against data/smollm2/victim.safetensors.
: "${REGIME:=}"
# Where the evaluation's victims start and how they train (see demo.sh).
: "${ORIGIN_FLAGS:=--embeddings $EMB}" "${TRAIN_FLAGS:=}"
read -r -a origin_flags <<< "$ORIGIN_FLAGS"; read -r -a train_flags <<< "$TRAIN_FLAGS"

log() { echo "attack: $*" >&2; }
# Run files are rendered by `report` (common/src/report/runfiles.rs); this script only orchestrates.
field() { "$BIN/report" field "$@"; }
mkdir -p "$RUN"

overlap_flag=(--concealment "$CONCEALMENT"); [ "$OVERLAP" = 1 ] && overlap_flag=(--allow-overlap)
init_flags=(--concealment "$CONCEALMENT"); [ "$OVERLAP" = 1 ] && init_flags=()
read -r -a extra_init_flags <<< "$INIT_FLAGS"; init_flags+=("${extra_init_flags[@]}")
budget_flags=(); rank_budget=()
if [ -n "$EVADE_FPR" ]; then
  budget_flags=(--evade-fpr "$EVADE_FPR" ${MINILM:+--minilm "$MINILM"} ${DETECTOR_CACHE:+--detector-cache "$DETECTOR_CACHE"})
  rank_budget=(--evade-fpr "$EVADE_FPR")
fi
init_flags+=("${budget_flags[@]}")
# Settings recorded only when set, so the manifests of runs without them stay as they were.
optional_settings=(); [ "$CONCEALMENT" = strict ] && optional_settings+=(--text concealment=strict)
[ -n "$OBJECTIVE_FLAGS" ] && optional_settings+=(--text "objective_flags=$OBJECTIVE_FLAGS")
[ -n "$INIT_FLAGS" ] && optional_settings+=(--text "init_flags=$INIT_FLAGS")
[ -n "$REGIME" ] && optional_settings+=(--text "regime=$REGIME")
[ -n "$EVADE_FPR" ] && optional_settings+=(--number "evade_fpr=$EVADE_FPR" --flag "evade_minilm=$([ -n "$MINILM" ] && echo true || echo false)")
read -r -a objective_flags <<< "$OBJECTIVE_FLAGS"
# The influence objective's v does not depend on the poisons: one solve per run.
cache_flags=(); [ "$OBJECTIVE" = influence ] && cache_flags=(--influence-cache "$RUN/influence-cache")
overlap_setting=false; [ "$OVERLAP" = 1 ] && overlap_setting=true
rollout=(--steps "$STEPS" --rollouts "$ROLLOUTS" --eta "$ETA" --clean-per-batch "$CLEAN_PER_BATCH" --adv-size "$ADV_SIZE" --seed "$SEED" ${REGIME:+--regime "$REGIME"})
ensemble=(); for e in $ENSEMBLE; do ensemble+=(--ensemble "$e"); done
read -r -a rank_flags <<< "$RANK_FLAGS"

# The manifest ties the folder to its settings and inputs; a resumed run must match it.
manifest=$("$BIN/report" attack-manifest --victim "$VICTIM_FILE" --data-manifest "$DATA/manifest.json" "${ensemble[@]}" \
  --number "count=$COUNT" --text "init=$INIT" --number "k=$K" --text "positions=$POSITIONS" --number "steps=$STEPS" \
  --number "rollouts=$ROLLOUTS" --number "eta=$ETA" --number "clean_per_batch=$CLEAN_PER_BATCH" --number "adv_size=$ADV_SIZE" \
  --number "seed=$SEED" --flag "overlap=$overlap_setting" --text "arch=$ARCH" --text "objective=$OBJECTIVE" --text "bases=$BASES" \
  "${optional_settings[@]}" --text "rank_flags=$RANK_FLAGS")
if [ -f "$RUN/manifest.json" ]; then
  if [ "$(cat "$RUN/manifest.json")" != "$manifest" ]; then
    log "$RUN holds a run with other settings or inputs; remove it or pick another RUN folder"
    diff <(cat "$RUN/manifest.json") <(echo "$manifest") >&2 || true
    exit 1
  fi
  log "resuming $RUN"
else
  printf '%s\n' "$manifest" > "$RUN/manifest.json.tmp" && mv "$RUN/manifest.json.tmp" "$RUN/manifest.json"
fi

# Temporary files of an invocation that was killed (finished files are never .tmp): the
# stages' hidden `.NAME.XXXX.tmp` and this script's own `NAME.tmp` (row.tsv, seconds.tsv, ...).
find "$RUN" -name '*.tmp' -prune -exec rm -rf {} +

# Runs one stage of round $r; a failure (bad input, NaN objective, ...) names the round.
stage() { # name command...
  local name=$1; shift
  "$@" || { log "round $r: $name failed (its error is above); finished rounds are kept, rerun to resume"; exit 1; }
}
# Seconds since $1 (an $EPOCHREALTIME), or - when the stage's output came from an earlier run.
since() { awk -v now="$EPOCHREALTIME" -v then="$1" 'BEGIN { printf "%.1f\n", now - then }'; }

r=0; r0="$RUN/round-000"; mkdir -p "$r0"
[ -f "$r0/poisons.jsonl" ] || stage init-poisons "$BIN/init-poisons" --victim "$VICTIM_FILE" --data "$DATA" --count "$COUNT" \
  --strategy "$INIT" --bases "$BASES" --seed "$SEED" "${init_flags[@]}" -o "$r0/poisons.jsonl"

# rounds.tsv is rebuilt (atomically) from the rounds' summaries after every round.
write_rounds() { # last round
  "$BIN/report" attack-rounds "$RUN" --through "$1" > "$RUN/rounds.tsv.tmp" && mv "$RUN/rounds.tsv.tmp" "$RUN/rounds.tsv"
}
prev="$r0/poisons.jsonl"; stale=0; last=0
for ((r = 1; r <= ROUNDS; r++)); do
  d=$(printf '%s/round-%03d' "$RUN" "$r"); mkdir -p "$d"
  if [ ! -f "$d/poisons.jsonl" ]; then
    grad_s=-; rank_s=-
    if [ ! -f "$d/grad.safetensors" ]; then
      t=$EPOCHREALTIME
      stage rollout-grad "$BIN/rollout-grad" --victim "$VICTIM_FILE" --data "$DATA" --poisons "$prev" \
        "${rollout[@]}" --objective "$OBJECTIVE" "${objective_flags[@]}" "${cache_flags[@]}" "${ensemble[@]}" --device "$DEVICE" -o "$d/grad.safetensors"
      grad_s=$(since "$t")
    fi
    if [ ! -f "$d/candidates.jsonl" ]; then
      t=$EPOCHREALTIME
      stage rank-candidates "$BIN/rank-candidates" --victim "$VICTIM_FILE" --data "$DATA" --grad "$d/grad.safetensors" \
        -k "$K" --positions "$POSITIONS" "${overlap_flag[@]}" "${rank_flags[@]}" "${rank_budget[@]}" -o "$d/candidates.jsonl"
      rank_s=$(since "$t")
    fi
    t=$EPOCHREALTIME
    stage verify-candidates "$BIN/verify-candidates" --victim "$VICTIM_FILE" --data "$DATA" --poisons "$prev" \
      --candidates "$d/candidates.jsonl" "${overlap_flag[@]}" "${ensemble[@]}" "${cache_flags[@]}" "${budget_flags[@]}" --device "$DEVICE" \
      ${WORKERS:+--workers "$WORKERS"} \
      --summary "$d/summary.json" -o "$d/poisons.jsonl"
    printf '%s\t%s\t%s\n' "$grad_s" "$rank_s" "$(since "$t")" > "$d/seconds.tsv.tmp" && mv "$d/seconds.tsv.tmp" "$d/seconds.tsv"
  fi
  write_rounds "$r"
  prev="$d/poisons.jsonl"; last=$r
  after=$(field "$d/summary.json" objective_after)
  if [ "$(field "$d/summary.json" flips_accepted)" = 0 ]; then stale=$((stale + 1)); else stale=0; fi
  if [ "$stale" -ge "$PATIENCE" ]; then log "no flip accepted for $PATIENCE rounds; stopping"; break; fi
  if [ -n "$TARGET_LADV" ] && [ -n "$after" ] && awk -v a="$after" -v b="$TARGET_LADV" 'BEGIN { exit !(a <= b) }'; then
    log "objective $after reached TARGET_LADV $TARGET_LADV; stopping"; break
  fi
done
[ "$last" -gt 0 ] || write_rounds 0
cp "$prev" "$RUN/poisons.jsonl.tmp" && mv "$RUN/poisons.jsonl.tmp" "$RUN/poisons.jsonl"
log "rounds done ($last); objective per round in $RUN/rounds.tsv:"
column -t "$RUN/rounds.tsv" >&2 || cat "$RUN/rounds.tsv" >&2

[ "$EVAL" = 1 ] || exit 0
for what in init final; do
  p="$RUN/poisons.jsonl"; [ "$what" = init ] && p="$r0/poisons.jsonl"
  [ -f "$RUN/eval-$what.json" ] || "$BIN/finetune-eval" --data "$DATA" "${origin_flags[@]}" --poisons "$p" \
    --arch "$ARCH" "${train_flags[@]}" --seeds "$EVAL_SEEDS" --seed-base "$SEED" --device "$DEVICE" \
    ${CLEAN_CACHE:+--clean-cache "$CLEAN_CACHE"} ${WORKERS:+--workers "$WORKERS"} -o "$RUN/eval-$what.json"
done
"$BIN/report" attack-table "$RUN" > "$RUN/table.txt.tmp"
mv "$RUN/table.txt.tmp" "$RUN/table.txt"
cat "$RUN/table.txt"
