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
# MODE=demo: every concealed row (baselines, heuristics, crafted) is made within the detection
# budget at BUDGET_FPR % false positives (init-poisons --evade-fpr: no cheap detector flags a
# poison at that rate on the clean training split); empty: the unconstrained sets.
: "${BUDGET_FPR:=}"
# Where the attacked victim and its early checkpoints live (cells of one trigger share them;
# each is trained under a lock), and finetune-eval's worker threads (empty: its default).
: "${VICTIMS_DIR:=$RUN}" "${WORKERS:=}"
# The MiniLM package the detection columns' minilm-trigger detector reads (skipped when absent).
: "${MINILM:=data/minilm}"
# Where victims start (ORIGIN_FLAGS: --embeddings FILE, or --pretrained DIR for minilm), how
# they train (TRAIN_FLAGS, given to train-victim and finetune-eval alike), the early
# checkpoints' epochs, and each crafting run's search settings (attack.sh variables; the
# rollout's ADV_SIZE and CLEAN_PER_BATCH come from the environment too).
: "${ORIGIN_FLAGS:=--embeddings $EMB}" "${TRAIN_FLAGS:=--epochs 4}" "${EARLY_EPOCHS:=1}"
: "${HARDNESS_SEARCH:=K=8 POSITIONS=all}" "${BILEVEL_SEARCH:=K=10 POSITIONS=2}"
# The influence objective's rollout-grad flags (its Hessian sample and damping: see
# `make objective-benchmark`) and search; it is first order in the poisons like hardness.
: "${INFLUENCE_FLAGS:=--hessian-examples 2000 --damping 0.001}" "${INFLUENCE_SEARCH:=K=8 POSITIONS=all}"
# Concealment of every concealed row (strict: no word leaks the trigger in any category of
# the strict audit; token: the paper's no-overlap only). The with-overlap row is the reference.
: "${CONCEALMENT:=strict}"
read -r -a origin_flags <<< "$ORIGIN_FLAGS"; read -r -a train_flags <<< "$TRAIN_FLAGS"
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
  [ -f "$1" ] || (flock 9; [ -f "$1" ] || "$BIN/train-victim" "${origin_flags[@]}" --train "$DATA/train.jsonl" --dev "$DATA/dev.jsonl" \
    --arch "$ARCH" --seed "$2" "${train_flags[@]}" "${@:3}" --device "$DEVICE" -o "$1") 9> "$(dirname "$1")/.$(basename "$1").lock"
}
train "$VICTIMS_DIR/victim.safetensors" "$SEED"
# The hardness objective averages the attacked victim with two early checkpoints
# (FINDINGS.md): poisons hard for all three are hard throughout training.
train "$VICTIMS_DIR/early-s$((SEED + 1)).safetensors" $((SEED + 1)) --epochs "$EARLY_EPOCHS"
train "$VICTIMS_DIR/early-s$((SEED + 2)).safetensors" $((SEED + 2)) --epochs "$EARLY_EPOCHS"
V="$VICTIMS_DIR/victim.safetensors"; ENSEMBLE="$VICTIMS_DIR/early-s$((SEED + 1)).safetensors $VICTIMS_DIR/early-s$((SEED + 2)).safetensors"

# One finetune-eval of every poison set listed in a variants.json (dir, variants file);
# --reuse skips it when evals.jsonl was made from the same inputs and flags.
evaluate() {
  local sets; mapfile -t sets < <("$BIN/report" poison-sets --as-args "$2")
  "$BIN/finetune-eval" --data "$DATA" "${origin_flags[@]}" --arch "$ARCH" "${train_flags[@]}" "${sets[@]}" --seeds "$EVAL_SEEDS" --seed-base "$SEED" \
    --device "$DEVICE" ${CLEAN_CACHE:+--clean-cache "$CLEAN_CACHE"} ${WORKERS:+--workers "$WORKERS"} \
    $([ -f "$MINILM/config.json" ] && echo --minilm "$MINILM") --reuse -o "$1/evals.jsonl"
}

# The budget every concealed row of this run is made within (MODE=demo), and what the budget
# reads besides the data: MiniLM when its package is there, its scores of the training split
# kept in DETECTOR_CACHE.
RUN_BUDGET=""; [ "$MODE" = demo ] && RUN_BUDGET=$BUDGET_FPR
budget_minilm=""; [ -f "$MINILM/config.json" ] && budget_minilm=$MINILM
: "${DETECTOR_CACHE:=$VICTIMS_DIR/detector-cache}"
budget_flags() { # fpr: sets the array budget (empty without a budget)
  budget=()
  if [ -n "$1" ]; then budget=(--evade-fpr "$1" --detector-cache "$DETECTOR_CACHE" ${budget_minilm:+--minilm "$budget_minilm"}); fi
}
init() { # out count bases strategy [concealment [more flags]]
  [ -f "$1" ] || "$BIN/init-poisons" --victim "$V" --data "$DATA" --count "$2" --seed "$SEED" \
    --bases "$3" --strategy "$4" --concealment "${5:-$CONCEALMENT}" "${@:6}" -o "$1"
}

# Crafting starts from the confident-bases heuristic with shared candidate filters, so the
# objective (and its search budget) is the only difference between crafting runs.
FILTERS="--min-count 5 --exclude-neighbours 50 --keep-substitutes"
craft() { # run-folder count settings...
  env VICTIM_FILE="$V" DATA="$DATA" EMB="$EMB" ORIGIN_FLAGS="$ORIGIN_FLAGS" TRAIN_FLAGS="$TRAIN_FLAGS" BIN="$BIN" COUNT="$2" INIT=neighbour BASES=confident SEED="$SEED" \
    ARCH="$ARCH" DEVICE="$DEVICE" EVAL=0 PATIENCE=2 CONCEALMENT="$CONCEALMENT" RUN="$1" EVADE_FPR="$RUN_BUDGET" \
    MINILM="$budget_minilm" DETECTOR_CACHE="$DETECTOR_CACHE" "${@:3}" "$(dirname "$0")/attack.sh"
}
craft_hardness() { # run-folder count [evasion budget: FPR percent]
  craft "$1" "$2" OBJECTIVE=hardness ENSEMBLE="$ENSEMBLE" ROUNDS="$ROUNDS" "${hardness_search[@]}" EVADE_FPR="${3:-}" \
    RANK_FLAGS="$FILTERS --per-poison 8"
}
# The influence objective on the rest of each sentence (the carrier kept, as hardness does),
# on the carrier slots only, or on both; plain or contrastive (extra rollout-grad flags).
# Base choice by influence instead of confidence: every D_adv sentence made a strictly
# concealed poison (nearest-neighbour carrier), then the COUNT with the lowest influence terms.
select_by_influence() { # out count
  [ -f "$1" ] && return
  local all="$1.candidates.jsonl" n
  n=$("$BIN/report" field "$DATA/manifest.json" counts.adv)
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

# The carriers (the words standing for the trigger's) of a set chosen by retraining
# (select-carriers): SELECT_RETRAIN candidates × SELECT_SEEDS attacker seeds from
# SELECT_SEED_BASE (apart from the evaluation's seeds) plus their clean twins, at most 40
# victims; within the run's budget. The clean twins are kept in the run's selection cache,
# so the second selection on the same bases trains none.
: "${SELECT_RETRAIN:=9}" "${SELECT_SEEDS:=3}" "${SELECT_SEED_BASE:=1000}"
select_carriers() { # dir stem input-poisons [candidates-from selection.json]
  local out="$1/select-$2"
  [ -f "$out/poisons.jsonl" ] && return
  mkdir -p "$out"
  budget_flags "$RUN_BUDGET"
  "$BIN/select-carriers" --victim "$V" --data "$DATA" "${origin_flags[@]}" --arch "$ARCH" "${train_flags[@]}" --poisons "$3" \
    --concealment "$CONCEALMENT" "${budget[@]}" --retrain "$SELECT_RETRAIN" --seeds "$SELECT_SEEDS" --seed-base "$SELECT_SEED_BASE" \
    --eta "${ETA:-0.03}" --clean-per-batch "${CLEAN_PER_BATCH:-64}" --adv-size "${ADV_SIZE:-128}" --seed "$SEED" --device "$DEVICE" \
    --clean-cache "$VICTIMS_DIR/selection-cache" ${4:+--candidates-from "$4"} --selection "$out/selection.json" -o "$out/poisons.jsonl"
}
# Where variant NAME's poison set is in DIR (file stem STEM).
variant_poisons() { # name dir stem
  local kind; read -r kind _ < <("$BIN/report" recipe "$1")
  case $kind in
    craft) echo "$2/craft-$3/poisons.jsonl" ;;
    select-carriers) echo "$2/select-$3/poisons.jsonl" ;;
    *) echo "$2/init-$3.jsonl" ;;
  esac
}

# Makes variant NAME's poison set in DIR (where `report variants-file` lists it) with COUNT
# poisons: `report recipe` says how (common/src/report/catalogue.rs).
make_variant() { # name dir count [stem: file name, default name]
  local stem=${4:-$1} kind a b c d
  read -r kind a b c d < <("$BIN/report" recipe "$1")
  case $kind in
    none) ;;
    init) # bases strategy concealment(- = the run's) evading
      local conceal=$c; [ "$c" = - ] && conceal=$CONCEALMENT
      # A concealed row (the run's concealment) within the run's budget; an evading variant
      # within EVADE_FPR's.
      local fpr=""; [ "$c" = - ] && fpr=$RUN_BUDGET; [ "$d" = yes ] && fpr=$EVADE_FPR
      budget_flags "$fpr"
      init "$2/init-$stem.jsonl" "$3" "$a" "$b" "$conceal" "${budget[@]}" ;;
    craft) # objective slots contrastive evading
      local dir="$2/craft-$stem"
      case $a in
        hardness) craft_hardness "$dir" "$3" "$([ "$d" = yes ] && echo "$EVADE_FPR" || echo "$RUN_BUDGET")" ;;
        bilevel) craft "$dir" "$3" OBJECTIVE=bilevel ROUNDS="$BILEVEL_ROUNDS" "${bilevel_search[@]}" RANK_FLAGS="$FILTERS" ;;
        influence) craft_influence "$dir" "$3" "$b" "$([ "$c" = yes ] && echo --contrastive)" ;;
        *) log "no crafting recipe for objective $a"; exit 1 ;;
      esac ;;
    select-by-influence) select_by_influence "$2/init-$stem.jsonl" "$3" ;;
    select-carriers) # from-variant candidates-from-variant(- = propose)
      make_variant "$a" "$2" "$3" "${stem/#$1/$a}"
      [ "$b" = - ] || make_variant "$b" "$2" "$3" "${stem/#$1/$b}"
      select_carriers "$2" "$stem" "$(variant_poisons "$a" "$2" "${stem/#$1/$a}")" \
        "$([ "$b" = - ] || echo "$2/select-${stem/#$1/$b}/selection.json")" ;;
    *) log "variant $1: unknown recipe $kind"; exit 1 ;;
  esac
}

# variants.json for the listed variants (report variants-file flags...), written atomically.
variants_file() { # out flags...
  "$BIN/report" variants-file "${@:2}" > "$1.tmp" && mv "$1.tmp" "$1"
}

if [ "$MODE" = cell ]; then
  for v in benign $VARIANTS; do make_variant "$v" "$RUN" "$COUNT"; done
  variants_file "$RUN/variants.json" --title "Cell $(basename "$RUN")" --dir "$RUN" --count "$COUNT" --evade-fpr "$EVADE_FPR" benign $VARIANTS
  evaluate "$RUN" "$RUN/variants.json"
  "$BIN/report" cell-done "$(basename "$RUN")" > "$RUN/cell.json.tmp" && mv "$RUN/cell.json.tmp" "$RUN/cell.json"
  exit 0
fi

if [ "$MODE" = sweep ]; then
  S="$RUN/sweep"; mkdir -p "$S"
  for n in $SWEEP_COUNTS; do
    for v in confident hardness; do make_variant "$v" "$S" "$n" "$v-n$n"; done
  done
  variants_file "$S/variants.json" --title "Net ASR against poison count" --dir "$S" --counts "$(echo $SWEEP_COUNTS | tr ' ' ,)" confident hardness
  evaluate "$S" "$S/variants.json"
  "$BIN/report" --sweep --variants "$S/variants.json" --evals "$S/evals.jsonl" --out-dir "$S" > /dev/null
  exit 0
fi

for v in unoptimised neighbour confident overlap benign relabelled; do make_variant "$v" "$RUN" "$COUNT"; done
t_craft=$EPOCHREALTIME
make_variant hardness "$RUN" "$COUNT"
t_bilevel=$EPOCHREALTIME
make_variant bilevel "$RUN" "$COUNT"
t_influence=$EPOCHREALTIME
make_variant influence "$RUN" "$COUNT"
t_select=$EPOCHREALTIME
make_variant hardness-carriers "$RUN" "$COUNT"
make_variant confident-carriers "$RUN" "$COUNT"
t_eval=$EPOCHREALTIME
title="Concealed poisons, $COUNT no-overlap poisons unless marked"
[ -n "$RUN_BUDGET" ] && title="$title; every concealed row within the detection budget at $RUN_BUDGET% FPR"
variants_file "$RUN/variants.json" --title "$title" --dir "$RUN" demo
evaluate "$RUN" "$RUN/variants.json"
t_end=$EPOCHREALTIME
awk -v s="$t_start" -v c="$t_craft" -v b="$t_bilevel" -v i="$t_influence" -v l="$t_select" -v e="$t_eval" -v z="$t_end" 'BEGIN { printf "victims and initial poisons %.0f s, hardness crafting %.0f s, bi-level crafting %.0f s, influence crafting %.0f s, carriers by retraining %.0f s, evaluation %.0f s (this invocation; finished steps are skipped)\n", c - s, b - c, i - b, l - i, e - l, z - e }' > "$RUN/times.txt.tmp" && mv "$RUN/times.txt.tmp" "$RUN/times.txt"
"$BIN/report" --variants "$RUN/variants.json" --evals "$RUN/evals.jsonl" --out-dir "$RUN" > /dev/null
