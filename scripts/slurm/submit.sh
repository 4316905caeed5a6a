#!/usr/bin/env bash
# Submits a sweep to a Slurm cluster: per victim preset one job array (one task per
# unfinished cell; --gres when the preset asks for a GPU), then a merge job that runs after
# every array task ended (afterany: failed cells are listed by the merge, not hidden).
#   scripts/slurm/submit.sh SPEC        (from the project's root, on a shared filesystem)
# Environment: THREADS (CPUs per cell, default 2), THROTTLE (array tasks at once, 8),
# PARTITION, SBATCH_FLAGS (extra sbatch flags). Resubmitting submits only unfinished cells;
# an interrupted cell resumes where it stopped. Prints the merge job's id on stdout.
set -euo pipefail
spec=${1:?usage: scripts/slurm/submit.sh SPEC}
: "${THREADS:=2}" "${THROTTLE:=8}" "${PARTITION:=}" "${SBATCH_FLAGS:=}"
log() { echo "submit: $*" >&2; }
# Binaries, venv and the spec's check before anything is queued (cells never build).
make --no-print-directory build >&2
BIN=target/release
dir=$("$BIN/sweep" dir "$spec")
mkdir -p "$dir/logs" "$dir/plan"
read -r -a extra <<< "$SBATCH_FLAGS"
[ -n "$PARTITION" ] && extra+=(--partition "$PARTITION")
jobs=()
while read -r victim; do
  plan="$dir/plan/$victim.tsv"
  "$BIN/sweep" plan "$spec" --victim "$victim" --pending --threads "$THREADS" > "$plan.tmp" && mv "$plan.tmp" "$plan"
  n=$(wc -l < "$plan")
  if [ "$n" -eq 0 ]; then log "$victim: every cell is finished"; continue; fi
  gres=$(make --no-print-directory -s slurm-gres VICTIM="$victim")
  id=$(sbatch --parsable --job-name "sweep-$victim" --array "1-$n%$THROTTLE" --cpus-per-task "$THREADS" \
    ${gres:+--gres "$gres"} --chdir "$PWD" --output "$dir/logs/array-%A_%a.out" "${extra[@]}" \
    scripts/slurm/cell.sbatch "$plan" "$dir/logs")
  log "$victim: $n cells as array job $id${gres:+ (--gres $gres)}"
  jobs+=("$id")
done < <("$BIN/sweep" victims "$spec")
dependency=(); [ "${#jobs[@]}" -gt 0 ] && dependency=(--dependency "afterany:$(IFS=:; echo "${jobs[*]}")")
merge=$(sbatch --parsable --job-name sweep-merge "${dependency[@]}" --chdir "$PWD" --output "$dir/logs/merge-%j.out" \
  "${extra[@]}" scripts/slurm/merge.sbatch "$spec")
log "merge job $merge (results in $dir/results.csv, missing cells in $dir/missing.txt)"
echo "$merge"
