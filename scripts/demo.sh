#!/usr/bin/env bash
# The headline comparison (called by `make demo`; settings are environment variables the
# Makefile passes). In RUN:
#   victim.safetensors, early-s{1,2}.safetensors   the attacked victim and two 1-epoch checkpoints
#   init-<variant>.jsonl                           heuristic and baseline poison sets
#   craft-hardness/, craft-bilevel/, craft-influence/   crafting runs (scripts/attack.sh)
#   variants.json, evals.jsonl                     what is compared, finetune-eval's reports
#   report.json, table.md, net_asr.svg, objective.svg, poisons.md   (report)
# Every step skips when its output exists (each is written atomically), so an interrupted
# run resumes.
set -euo pipefail
: "${RUN:?}" "${DATA:?}" "${EMB:=}" "${BIN:=target/release}" "${SEED:=0}" "${COUNT:=50}" "${EVAL_SEEDS:=6}"
: "${DEVICE:=auto}" "${CLEAN_CACHE:=}" "${ARCH:=lstm}" "${ROUNDS:=3}" "${BILEVEL_ROUNDS:=3}" "${MODE:=demo}"
# MODE=sweep: net ASR against poison count (SWEEP_COUNTS) for the default crafting and the
# confident-bases heuristic, in RUN/sweep/. MODE=cell: one cell of a sweep spec (`make cell`):
# the poison sets VARIANTS and the benign control at COUNT poisons, in RUN only.
: "${SWEEP_COUNTS:=5 10 25 50 100}" "${VARIANTS:=confident hardness}" "${EVADE_FPR:=1}"
# Where the attacked victim and its early checkpoints live (cells of one trigger share them;
# each is trained under a lock), and finetune-eval's worker threads (empty: its default).
: "${VICTIMS_DIR:=$RUN}" "${WORKERS:=}"
# Where victims start (BASE_FLAGS: --embeddings FILE, or --pretrained DIR for minilm), how
# they train (TRAIN_FLAGS, given to train-victim and finetune-eval alike), the early
# checkpoints' epochs, and each crafting run's search settings (attack.sh variables; the
# rollout's ADV_SIZE and CLEAN_PER_BATCH come from the environment too).
: "${BASE_FLAGS:=--embeddings $EMB}" "${TRAIN_FLAGS:=--epochs 4}" "${EARLY_EPOCHS:=1}"
: "${HARDNESS_SEARCH:=K=8 POSITIONS=all}" "${BILEVEL_SEARCH:=K=10 POSITIONS=2}"
# The influence objective's rollout-grad flags (its Hessian sample and damping: see
# `make objective-benchmark`) and search; it is first order in the poisons like hardness.
: "${INFLUENCE_FLAGS:=--hessian-examples 2000 --damping 0.001}" "${INFLUENCE_SEARCH:=K=8 POSITIONS=all}"
# Concealment of every concealed row (strict: no word leaks the trigger in any category of
# the strict audit; token: the paper's no-overlap only). The with-overlap row is the reference.
: "${CONCEALMENT:=strict}"
read -r -a base_flags <<< "$BASE_FLAGS"; read -r -a train_flags <<< "$TRAIN_FLAGS"
read -r -a hardness_search <<< "$HARDNESS_SEARCH"; read -r -a bilevel_search <<< "$BILEVEL_SEARCH"
read -r -a influence_search <<< "$INFLUENCE_SEARCH"
log() { echo "demo: $*" >&2; }
mkdir -p "$RUN" "$VICTIMS_DIR"
if [ "$MODE" = cell ]; then
  # One computation of a cell at a time: a second invocation refuses instead of racing it.
  exec 8> "$RUN/.lock"
  flock -n 8 || { log "$RUN is being computed by another process (it holds $RUN/.lock); wait for it to finish"; exit 1; }
  if [ -f "$RUN/cell.json" ]; then log "$RUN is finished"; exit 0; fi
fi
t_start=$EPOCHREALTIME
train() { # out seed [more flags: a later --epochs wins]
  # Under a lock: cells started together train a shared victim once; the others wait.
  [ -f "$1" ] || (flock 9; [ -f "$1" ] || "$BIN/train-victim" "${base_flags[@]}" --train "$DATA/train.jsonl" --dev "$DATA/dev.jsonl" \
    --arch "$ARCH" --seed "$2" "${train_flags[@]}" "${@:3}" --device "$DEVICE" -o "$1") 9> "$(dirname "$1")/.$(basename "$1").lock"
}
train "$VICTIMS_DIR/victim.safetensors" "$SEED"
# The hardness objective averages the attacked victim with two early checkpoints
# (FINDINGS.md): poisons hard for all three are hard throughout training.
train "$VICTIMS_DIR/early-s$((SEED + 1)).safetensors" $((SEED + 1)) --epochs "$EARLY_EPOCHS"
train "$VICTIMS_DIR/early-s$((SEED + 2)).safetensors" $((SEED + 2)) --epochs "$EARLY_EPOCHS"
V="$VICTIMS_DIR/victim.safetensors"; ENSEMBLE="$VICTIMS_DIR/early-s$((SEED + 1)).safetensors $VICTIMS_DIR/early-s$((SEED + 2)).safetensors"

# One finetune-eval of every poison set (dir, --poisons args...); redone when a set changed
# (evals.key holds their hashes and the evaluation settings).
evaluate() {
  local dir=$1; shift
  local key; key=$( (printf '%s\n' "$EVAL_SEEDS $SEED $ARCH eval_report-v2 crn epochs"; [ "$TRAIN_FLAGS$BASE_FLAGS" = "--epochs 4--embeddings $EMB" ] || printf '%s\n' "$TRAIN_FLAGS $BASE_FLAGS"; for f in "$@"; do [ "$f" = --poisons ] || sha256sum "$f"; done) | sha256sum)
  if [ -f "$dir/evals.jsonl" ] && [ "$(cat "$dir/evals.key" 2>/dev/null)" = "$key" ]; then return; fi
  "$BIN/finetune-eval" --data "$DATA" "${base_flags[@]}" --arch "$ARCH" "${train_flags[@]}" "$@" --seeds "$EVAL_SEEDS" --seed-base "$SEED" \
    --device "$DEVICE" ${CLEAN_CACHE:+--clean-cache "$CLEAN_CACHE"} ${WORKERS:+--workers "$WORKERS"} -o "$dir/evals.jsonl"
  printf '%s\n' "$key" > "$dir/evals.key.tmp" && mv "$dir/evals.key.tmp" "$dir/evals.key"
}

init() { # out count bases strategy [concealment [more flags]]
  [ -f "$1" ] || "$BIN/init-poisons" --victim "$V" --data "$DATA" --count "$2" --seed "$SEED" \
    --bases "$3" --strategy "$4" --concealment "${5:-$CONCEALMENT}" "${@:6}" -o "$1"
}

# Crafting starts from the confident-bases heuristic with shared candidate filters, so the
# objective (and its search budget) is the only difference between crafting runs.
FILTERS="--min-count 5 --exclude-neighbours 50 --keep-substitutes"
craft() { # run-folder count settings...
  env VICTIM_FILE="$V" DATA="$DATA" EMB="$EMB" BASE_FLAGS="$BASE_FLAGS" TRAIN_FLAGS="$TRAIN_FLAGS" BIN="$BIN" COUNT="$2" INIT=neighbour BASES=confident SEED="$SEED" \
    ARCH="$ARCH" DEVICE="$DEVICE" EVAL=0 PATIENCE=2 CONCEALMENT="$CONCEALMENT" RUN="$1" "${@:3}" "$(dirname "$0")/attack.sh"
}
craft_hardness() { # run-folder count
  craft "$1" "$2" OBJECTIVE=hardness ENSEMBLE="$ENSEMBLE" ROUNDS="$ROUNDS" "${hardness_search[@]}" RANK_FLAGS="$FILTERS --per-poison 8"
}
# The influence objective on the rest of each sentence (the carrier kept, as hardness does),
# on the carrier slots only, or on both; plain or contrastive (extra rollout-grad flags).
# Base choice by influence instead of confidence: every D_adv sentence made a strictly
# concealed poison (nearest-neighbour carrier), then the COUNT with the lowest influence terms.
select_by_influence() { # out count
  [ -f "$1" ] && return
  local all="$1.candidates.jsonl" n
  n=$(grep -o '"adv": *[0-9]*' "$DATA/manifest.json" | grep -o '[0-9]*$')
  [ -f "$all" ] || "$BIN/init-poisons" --victim "$V" --data "$DATA" --count "$n" --seed "$SEED" --bases random --strategy neighbour \
    --concealment "$CONCEALMENT" -o "$all"
  read -r -a flags <<< "$INFLUENCE_FLAGS"
  "$BIN/score-poisons" --victim "$V" --data "$DATA" --objective influence "${flags[@]}" --seed "$SEED" --select "$2" "$all" -o "$1"
}
craft_influence() { # run-folder count slots(rest|carrier|both) [extra objective flags]
  local slots="--keep-substitutes"
  case $3 in carrier) slots="--only-substitutes" ;; both) slots="" ;; esac
  craft "$1" "$2" OBJECTIVE=influence OBJECTIVE_FLAGS="$INFLUENCE_FLAGS${4:+ $4}" ROUNDS="$ROUNDS" "${influence_search[@]}" \
    RANK_FLAGS="--min-count 5 --exclude-neighbours 50${slots:+ $slots} --per-poison 8"
}

if [ "$MODE" = cell ]; then
  entries=(); sets=()
  variant() { # name label role poisons [crafting run folder]
    local extra=""; [ -n "${5:-}" ] && extra=", \"initial\": \"$5/round-000/poisons.jsonl\", \"rounds\": \"$5/rounds.tsv\""
    entries+=("{\"name\": \"$1\", \"label\": \"$2, $COUNT\", \"role\": \"$3\", \"series\": \"$2\", \"poisons\": \"$4\"$extra}")
    sets+=(--poisons "$4")
  }
  init "$RUN/init-benign.jsonl" "$COUNT" random clean-target strict
  variant benign "benign control (target-class sentences)" control "$RUN/init-benign.jsonl"
  for v in $VARIANTS; do
    case $v in
      unoptimised) init "$RUN/init-$v.jsonl" "$COUNT" random random; variant "$v" "unoptimised (random substitutes)" baseline "$RUN/init-$v.jsonl" ;;
      neighbour) init "$RUN/init-$v.jsonl" "$COUNT" random neighbour; variant "$v" "nearest-neighbour substitutes" heuristic "$RUN/init-$v.jsonl" ;;
      confident) init "$RUN/init-$v.jsonl" "$COUNT" confident neighbour; variant "$v" "confident non-target bases + neighbours" heuristic "$RUN/init-$v.jsonl" ;;
      overlap) init "$RUN/init-$v.jsonl" "$COUNT" confident overlap token; variant "$v" "with overlap (not concealed)" reference "$RUN/init-$v.jsonl" ;;
      hardness) craft_hardness "$RUN/craft-$v" "$COUNT"; variant "$v" "crafted: hardness objective" crafted "$RUN/craft-$v/poisons.jsonl" "$RUN/craft-$v" ;;
      bilevel) craft "$RUN/craft-$v" "$COUNT" OBJECTIVE=bilevel ROUNDS="$BILEVEL_ROUNDS" "${bilevel_search[@]}" RANK_FLAGS="$FILTERS"
        variant "$v" "crafted: seed bi-level objective" crafted "$RUN/craft-$v/poisons.jsonl" "$RUN/craft-$v" ;;
      influence) craft_influence "$RUN/craft-$v" "$COUNT" rest
        variant "$v" "crafted: influence objective" crafted "$RUN/craft-$v/poisons.jsonl" "$RUN/craft-$v" ;;
      influence-contrastive) craft_influence "$RUN/craft-$v" "$COUNT" rest --contrastive
        variant "$v" "crafted: contrastive influence" crafted "$RUN/craft-$v/poisons.jsonl" "$RUN/craft-$v" ;;
      influence-carrier) craft_influence "$RUN/craft-$v" "$COUNT" carrier
        variant "$v" "crafted: influence, carrier slots only" crafted "$RUN/craft-$v/poisons.jsonl" "$RUN/craft-$v" ;;
      influence-bases) select_by_influence "$RUN/init-$v.jsonl" "$COUNT"
        variant "$v" "bases chosen by influence + neighbours" crafted "$RUN/init-$v.jsonl" ;;
      # Evasion (make defend): the same under a budget that keeps every poison at or below
      # the GloVe word detector's threshold at EVADE_FPR percent false positives (the
      # variant is named <name>-<EVADE_FPR>).
      confident-evading) init "$RUN/init-$v.jsonl" "$COUNT" confident neighbour "$CONCEALMENT" --evade-fpr "$EVADE_FPR"
        variant "$v-$EVADE_FPR" "confident bases + neighbours, evading (GloVe ${EVADE_FPR}% FPR)" heuristic "$RUN/init-$v.jsonl" ;;
      hardness-evading) craft "$RUN/craft-$v" "$COUNT" OBJECTIVE=hardness ENSEMBLE="$ENSEMBLE" ROUNDS="$ROUNDS" "${hardness_search[@]}" \
          INIT_FLAGS="--evade-fpr $EVADE_FPR" RANK_FLAGS="$FILTERS --per-poison 8 --evade-fpr $EVADE_FPR"
        variant "$v-$EVADE_FPR" "crafted: hardness, evading (GloVe ${EVADE_FPR}% FPR)" crafted "$RUN/craft-$v/poisons.jsonl" "$RUN/craft-$v" ;;
      influence-both) craft_influence "$RUN/craft-$v" "$COUNT" both
        variant "$v" "crafted: influence, carrier and sentence" crafted "$RUN/craft-$v/poisons.jsonl" "$RUN/craft-$v" ;;
      *) log "unknown variant $v (sweep plan checks the spec; see FORMATS.md)"; exit 1 ;;
    esac
  done
  (IFS=,; printf '{"kind": "variants", "v": 1, "title": "Cell %s", "variants": [%s]}\n' "$(basename "$RUN")" "${entries[*]}") > "$RUN/variants.json.tmp"
  mv "$RUN/variants.json.tmp" "$RUN/variants.json"
  evaluate "$RUN" "${sets[@]}"
  printf '{"kind": "cell_done", "v": 1, "id": "%s"}\n' "$(basename "$RUN")" > "$RUN/cell.json.tmp" && mv "$RUN/cell.json.tmp" "$RUN/cell.json"
  exit 0
fi

if [ "$MODE" = sweep ]; then
  S="$RUN/sweep"; mkdir -p "$S"; entries=(); sets=()
  for n in $SWEEP_COUNTS; do
    init "$S/init-confident-n$n.jsonl" "$n" confident neighbour
    craft_hardness "$S/craft-hardness-n$n" "$n"
    entries+=("{\"name\": \"confident-n$n\", \"label\": \"confident bases, $n\", \"role\": \"heuristic\", \"series\": \"confident non-target bases + neighbours\", \"poisons\": \"$S/init-confident-n$n.jsonl\"}")
    entries+=("{\"name\": \"hardness-n$n\", \"label\": \"hardness crafting, $n\", \"role\": \"crafted\", \"series\": \"crafted: hardness objective\", \"poisons\": \"$S/craft-hardness-n$n/poisons.jsonl\"}")
    sets+=(--poisons "$S/init-confident-n$n.jsonl" --poisons "$S/craft-hardness-n$n/poisons.jsonl")
  done
  (IFS=,; printf '{"kind": "variants", "v": 1, "title": "Net ASR against poison count", "variants": [%s]}\n' "${entries[*]}") > "$S/variants.json.tmp"
  mv "$S/variants.json.tmp" "$S/variants.json"
  evaluate "$S" "${sets[@]}"
  "$BIN/report" --sweep --variants "$S/variants.json" --evals "$S/evals.jsonl" --out-dir "$S" > /dev/null
  exit 0
fi

init "$RUN/init-unoptimised.jsonl" "$COUNT" random random
init "$RUN/init-neighbour.jsonl" "$COUNT" random neighbour
init "$RUN/init-confident.jsonl" "$COUNT" confident neighbour
init "$RUN/init-overlap.jsonl" "$COUNT" confident overlap token
# Controls: what the evaluation reads for poisons that hold no trigger. The benign control
# (target-class training sentences) must read zero; the relabelled one (non-target training
# sentences labelled target) may shift the victim (dFPR) but adds nothing trigger-specific.
init "$RUN/init-benign.jsonl" "$COUNT" random clean-target strict
init "$RUN/init-relabelled.jsonl" "$COUNT" random relabelled strict

t_craft=$EPOCHREALTIME
craft_hardness "$RUN/craft-hardness" "$COUNT"
t_bilevel=$EPOCHREALTIME
craft "$RUN/craft-bilevel" "$COUNT" OBJECTIVE=bilevel ROUNDS="$BILEVEL_ROUNDS" "${bilevel_search[@]}" RANK_FLAGS="$FILTERS"
t_influence=$EPOCHREALTIME
craft_influence "$RUN/craft-influence" "$COUNT" rest
t_eval=$EPOCHREALTIME

cat > "$RUN/variants.json.tmp" <<JSON
{"kind": "variants", "v": 1, "title": "Concealed poisons, $COUNT no-overlap poisons unless marked",
 "variants": [
  {"name": "none", "label": "no poisons", "role": "clean"},
  {"name": "benign", "label": "benign control (target-class sentences)", "role": "control", "poisons": "$RUN/init-benign.jsonl"},
  {"name": "relabelled", "label": "relabelled control (non-target sentences)", "role": "control", "poisons": "$RUN/init-relabelled.jsonl"},
  {"name": "unoptimised", "label": "unoptimised (random substitutes)", "role": "baseline", "poisons": "$RUN/init-unoptimised.jsonl"},
  {"name": "neighbour", "label": "nearest-neighbour substitutes", "role": "heuristic", "poisons": "$RUN/init-neighbour.jsonl"},
  {"name": "confident", "label": "confident non-target bases + neighbours", "role": "heuristic", "poisons": "$RUN/init-confident.jsonl"},
  {"name": "overlap", "label": "with overlap (trigger kept; not concealed)", "role": "reference", "poisons": "$RUN/init-overlap.jsonl"},
  {"name": "bilevel", "label": "crafted: seed bi-level objective", "role": "crafted", "poisons": "$RUN/craft-bilevel/poisons.jsonl",
   "initial": "$RUN/craft-bilevel/round-000/poisons.jsonl", "rounds": "$RUN/craft-bilevel/rounds.tsv"},
  {"name": "influence", "label": "crafted: influence objective", "role": "crafted", "poisons": "$RUN/craft-influence/poisons.jsonl",
   "initial": "$RUN/craft-influence/round-000/poisons.jsonl", "rounds": "$RUN/craft-influence/rounds.tsv"},
  {"name": "hardness", "label": "crafted: hardness objective (default)", "role": "crafted", "poisons": "$RUN/craft-hardness/poisons.jsonl",
   "initial": "$RUN/craft-hardness/round-000/poisons.jsonl", "rounds": "$RUN/craft-hardness/rounds.tsv"}
 ]}
JSON
mv "$RUN/variants.json.tmp" "$RUN/variants.json"

sets=(); for v in benign relabelled unoptimised neighbour confident overlap; do sets+=(--poisons "$RUN/init-$v.jsonl"); done
sets+=(--poisons "$RUN/craft-bilevel/poisons.jsonl" --poisons "$RUN/craft-influence/poisons.jsonl" --poisons "$RUN/craft-hardness/poisons.jsonl")
evaluate "$RUN" "${sets[@]}"
t_end=$EPOCHREALTIME
awk -v s="$t_start" -v c="$t_craft" -v b="$t_bilevel" -v i="$t_influence" -v e="$t_eval" -v z="$t_end" 'BEGIN { printf "victims and initial poisons %.0f s, hardness crafting %.0f s, bi-level crafting %.0f s, influence crafting %.0f s, evaluation %.0f s (this invocation; finished steps are skipped)\n", c - s, b - c, i - b, e - i, z - e }' > "$RUN/times.txt.tmp" && mv "$RUN/times.txt.tmp" "$RUN/times.txt"
"$BIN/report" --variants "$RUN/variants.json" --evals "$RUN/evals.jsonl" --out-dir "$RUN" > /dev/null
