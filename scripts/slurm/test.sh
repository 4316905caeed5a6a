#!/usr/bin/env bash
# The sweep machinery against a real Slurm (make test-cluster): installs Slurm and munge from
# the distribution's packages when missing (needs root), starts a single-node controller and
# node in a temporary folder, submits the tiny fixture sweep through scripts/slurm/submit.sh
# (sweeps/tiny.json with its second trigger only, "Woody Allen" → negative: 2 counts, the
# bag-of-words preset; tests/sweep.rs runs the first, and one trigger is what the machinery
# needs, a minute less of make test), waits for its merge, runs the same sweep with make -j 2,
# checks that the two merged tables are equal, and stops the daemons it started (by their pid
# files, never by name).
set -euo pipefail
cd "$(dirname "$0")/../.."
log() { echo "slurm-test: $*" >&2; }
t0=$SECONDS
if ! command -v slurmctld > /dev/null || ! command -v munged > /dev/null; then
  [ "$(id -u)" = 0 ] || { log "Slurm is not installed and this is not root; install slurmctld slurmd slurm-client munge"; exit 1; }
  log "installing Slurm and munge from the distribution's packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq > /dev/null && apt-get install -y -qq slurmctld slurmd slurm-client munge > /dev/null
fi
tmp=$(mktemp -d /tmp/slurm-test.XXXXXX)
export SLURM_CONF=$tmp/slurm.conf
pids=()
stop() {
  for f in "$tmp/slurmd.pid" "$tmp/slurmctld.pid" "${munge_pid_file:-}"; do
    [ -n "$f" ] && [ -f "$f" ] && kill "$(cat "$f")" 2> /dev/null || true
  done
  sleep 1
  rm -rf "$tmp"
}
trap stop EXIT
# munge: the package's key, owned by munge, mode 400; its run folder; the daemon as munge.
munge_pid_file=
if ! munge -n 2> /dev/null | unmunge > /dev/null 2>&1; then
  mkdir -p /run/munge && chown munge: /run/munge
  chown munge: /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p "$tmp/munge" && chown munge: "$tmp/munge" && chmod 755 "$tmp"
  su -s /bin/sh munge -c "/usr/sbin/munged --pid-file=$tmp/munge/munged.pid"
  munge_pid_file=$tmp/munge/munged.pid
fi
munge -n | unmunge > /dev/null || { log "munge does not work"; exit 1; }
host=$(hostname); mem=$(( $(free -m | awk '/^Mem:/ {print $7}') * 8 / 10 ))
mkdir -p "$tmp/state" "$tmp/spool"
cat > "$SLURM_CONF" <<CONF
ClusterName=poison-test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$tmp/state
SlurmdSpoolDir=$tmp/spool
SlurmctldPidFile=$tmp/slurmctld.pid
SlurmdPidFile=$tmp/slurmd.pid
SlurmctldLogFile=$tmp/slurmctld.log
SlurmdLogFile=$tmp/slurmd.log
NodeName=$host CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
slurmctld -f "$SLURM_CONF"; slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do sinfo -h -o %T 2> /dev/null | grep -q idle && break; sleep 1; done
sinfo -h -o %T | grep -q idle || { log "the node did not come up; $tmp/slurmctld.log and slurmd.log say why"; cat "$tmp"/*.log >&2; exit 1; }
log "Slurm is up ($(sinfo -h -o '%N %c CPUs %m MB' | head -1)) after $((SECONDS - t0)) s"

# The same tiny sweep twice under two names: through Slurm, and with make -j 2.
mkdir -p runs/sweeps
for name in tiny-slurm tiny-make; do
  python3 -c 'import json, sys; s = json.load(open("sweeps/tiny.json")); s["name"] = sys.argv[1]; s["triggers"] = s["triggers"][1:]; print(json.dumps(s))' "$name" > "$tmp/$name.json"
  rm -rf "runs/sweeps/$name"
done
t1=$SECONDS
merge=$(THREADS=1 THROTTLE=4 scripts/slurm/submit.sh "$tmp/tiny-slurm.json")
for _ in $(seq 900); do [ -z "$(squeue -h -j "$merge" 2> /dev/null)" ] && break; sleep 1; done
[ -z "$(squeue -h -j "$merge" 2> /dev/null)" ] || { log "the merge job $merge did not finish in 15 minutes"; squeue >&2; exit 1; }
log "Slurm sweep and merge done in $((SECONDS - t1)) s; logs in runs/sweeps/tiny-slurm/logs/"
t2=$SECONDS
# One thread per cell in both runs: a victim's float rounding depends on how its training is
# grouped, so results are bit for bit equal only for equal thread counts (README, Sweeps).
make --no-print-directory sweep SPEC="$tmp/tiny-make.json" -j 2 THREADS=1 > "$tmp/make.log" 2>&1 || { cat "$tmp/make.log" >&2; exit 1; }
log "make -j 2 sweep done in $((SECONDS - t2)) s"
for name in tiny-slurm tiny-make; do
  [ -s "runs/sweeps/$name/results.csv" ] || { log "runs/sweeps/$name/results.csv is missing or empty"; exit 1; }
  [ ! -s "runs/sweeps/$name/missing.txt" ] || { log "$name has missing cells:"; cat "runs/sweeps/$name/missing.txt" >&2; exit 1; }
done
if ! cmp -s runs/sweeps/tiny-slurm/results.csv runs/sweeps/tiny-make/results.csv; then
  log "the merged results differ between Slurm and make -j:"; diff runs/sweeps/tiny-slurm/results.csv runs/sweeps/tiny-make/results.csv >&2; exit 1
fi
rows=$(($(wc -l < runs/sweeps/tiny-slurm/results.csv) - 1))
log "ok: Slurm and make -j 2 merged the same $rows rows; total $((SECONDS - t0)) s"
rm -rf runs/sweeps/tiny-slurm runs/sweeps/tiny-make
