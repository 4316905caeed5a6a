#!/usr/bin/env bash
# The defenses against the demo's poison sets (called by `make defend` after `make demo`;
# settings are environment variables the Makefile passes). In RUN/defend:
#   scores/<variant>.jsonl          detect-poisons on the training set with each poison set
#   cache/                          MiniLM scores by text (each clean text encoded once)
#   <set>/kept-<detector>-<q>.jsonl the training set with the set's poisons, top q% removed
#   filter-evals.jsonl(.key)        finetune-eval of the filtered sets (paired with the
#                                   unfiltered clean twins of the demo's seeds)
#   evading-<fpr>/                  a cell (demo.sh MODE=cell) of poison sets crafted to stay
#                                   below the GloVe word detector's threshold at fpr %
#   defense.json, defense.md, roc.svg, epochs.svg   (report defend)
# Early stopping reads the demo's own evals.jsonl (finetune-eval measures every epoch).
# Every step skips when its output exists (each is written atomically): an interrupted run
# resumes.
set -euo pipefail
: "${RUN:?}" "${DATA:?}" "${EMB:?}" "${BIN:=target/release}" "${SEED:=0}" "${DEVICE:=auto}" "${ARCH:=lstm}"
: "${MINILM:=data/minilm}" "${CLEAN_CACHE:=}" "${ORIGIN_FLAGS:=--embeddings $EMB}" "${TRAIN_FLAGS:=--epochs 4}"
# Which poison sets are retrained after filtering, with which detectors and shares, on how
# many of the demo's seeds (the first FILTER_SEEDS, so the clean twins come from its cache).
: "${FILTER_SETS:=confident hardness}" "${FILTER_DETECTORS:=perplexity onion glove-trigger glove-trigger-word minilm-trigger loss-mean loss-final spectral}"
: "${FILTER_PERCENTS:=1 5}" "${FILTER_SEEDS:=3}" "${WORKERS:=}"
# Evasion variants (demo.sh cell variants; empty: none) and their budgets (FPR, percent).
: "${EVADE_VARIANTS:=confident-evading hardness-evading}" "${EVADE_FPRS=}"
read -r -a origin_flags <<< "$ORIGIN_FLAGS"; read -r -a train_flags <<< "$TRAIN_FLAGS"
# The training-dynamics detectors train word-table victims like the demo's (a MiniLM demo's
# defender trains the BiLSTM on GloVe for them).
dyn_flags=(--arch "$ARCH" "${train_flags[@]}"); case $ARCH in bow|lstm) ;; *) dyn_flags=(--arch lstm) ;; esac
log() { echo "defend: $*" >&2; }
[ -f "$RUN/variants.json" ] && [ -f "$RUN/evals.jsonl" ] || { log "$RUN has no finished demo (variants.json, evals.jsonl): run make demo first"; exit 1; }
D="$RUN/defend"; mkdir -p "$D/scores" "$D/cache"
trigger=$("$BIN/report" field "$DATA/manifest.json" trigger.phrase)
# The poison sets of the demo ("name file" lines).
mapfile -t sets < <("$BIN/report" poison-sets "$RUN/variants.json")
score() { # "name poisons" lines: detect-poisons on the training set with each poison set
  local entry name poisons out
  for entry in "$@"; do
    read -r name poisons <<< "$entry"
    out="$D/scores/$name.jsonl"
    [ -f "$out" ] && continue
    log "scoring the training set with the $name poisons"
    # The defender screens the data it trains on (clean training split + poisons) and holds
    # back the dev split as its clean reference text.
    cat "$DATA/train.jsonl" "$poisons" | "$BIN/detect-poisons" --embeddings "$EMB" --trigger "$trigger" --minilm "$MINILM" \
      --reference "$DATA/dev.jsonl" --cache "$D/cache" "${dyn_flags[@]}" --seed "$SEED" --device "$DEVICE" \
      ${WORKERS:+--workers "$WORKERS"} -o "$out"
  done
}
t0=$EPOCHREALTIME
score "${sets[@]}"
t1=$EPOCHREALTIME

# Filter, then train: every kept set of every FILTER_SETS poison set in one finetune-eval.
args=()
for name in $FILTER_SETS; do
  poisons=$(printf '%s\n' "${sets[@]}" | awk -v n="$name" '$1 == n { print $2 }')
  [ -n "$poisons" ] || { log "FILTER_SETS names $name, which is not a poison set of $RUN/variants.json"; exit 1; }
  mkdir -p "$D/$name"
  for det in $FILTER_DETECTORS; do
    for q in $FILTER_PERCENTS; do
      kept="$D/$name/kept-$det-$q.jsonl"
      [ -f "$kept" ] || cat "$DATA/train.jsonl" "$poisons" | "$BIN/filter-set" --scores "$D/scores/$name.jsonl" --by "$det" --remove "$q" -o "$kept"
      args+=(--poisons "$poisons" --kept "$kept")
    done
  done
done
if [ ${#args[@]} -gt 0 ]; then
  log "retraining $(( ${#args[@]} / 4 )) filtered training sets on $FILTER_SEEDS seeds (reused when current)"
  "$BIN/finetune-eval" --data "$DATA" "${origin_flags[@]}" --arch "$ARCH" "${train_flags[@]}" "${args[@]}" --seeds "$FILTER_SEEDS" --seed-base "$SEED" \
    --device "$DEVICE" ${CLEAN_CACHE:+--clean-cache "$CLEAN_CACHE"} ${WORKERS:+--workers "$WORKERS"} --reuse -o "$D/filter-evals.jsonl" 2> "$D/filter-evals.log" \
    || { tail -5 "$D/filter-evals.log" >&2; exit 1; }
fi
t2=$EPOCHREALTIME

# Evasion: the confident-bases heuristic and hardness crafting under a budget that keeps
# every poison at or below the GloVe word detector's threshold at each of EVADE_FPRS %
# false positives, evaluated like a sweep cell of the demo (same victim, seeds and clean
# twins), then screened like the other sets.
evade_args=()
for fpr in $EVADE_FPRS; do
  [ -n "$EVADE_VARIANTS" ] || break
  E="$D/evading-$fpr"
  env RUN="$E" VICTIMS_DIR="${VICTIMS_DIR:-$RUN}" MODE=cell VARIANTS="$EVADE_VARIANTS" EVADE_FPR="$fpr" "$(dirname "$0")/demo.sh"
  evade_args+=(--variants "$E/variants.json" --evals "$E/evals.jsonl")
  mapfile -t evading < <("$BIN/report" poison-sets --name-contains=-evading- "$E/variants.json")
  score "${evading[@]}"
done
t3=$EPOCHREALTIME
awk -v a="$t0" -v b="$t1" -v c="$t2" -v d="$t3" 'BEGIN { printf "scoring %.0f s, filter-then-train %.0f s, evasion (crafting, evaluation, scoring) %.0f s (this invocation; finished steps are skipped)\n", b - a, c - b, d - c }' > "$D/times.txt.tmp" && mv "$D/times.txt.tmp" "$D/times.txt"
"$BIN/report" defend --variants "$RUN/variants.json" --evals "$RUN/evals.jsonl" "${evade_args[@]}" \
  --scores-dir "$D/scores" ${args[0]:+--filter-evals "$D/filter-evals.jsonl"} --out-dir "$D"
