#!/usr/bin/env bash
# Prints the demo's summary table (stdout) from the victims and reports in a run folder.
set -euo pipefail
run=$1; shift
printf '%-6s %-22s %-18s %-26s\n' victim "dev acc (seed 0)" "test CACC" "clean ASR (trigger only)"
for arch in "$@"; do
  python3 - "$run/victim-$arch.safetensors" "$run/eval-$arch.json" "$arch" <<'PY'
import json, struct, sys
victim, report, arch = sys.argv[1:]
with open(victim, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    meta = json.loads(f.read(n))["__metadata__"]
r = json.load(open(report))
s = r["summary"]
fmt = lambda m: f"{m['mean']:.1f} ± {m['ci95']:.1f}" if m.get("ci95") is not None else f"{m['mean']:.1f}"
print(f"{arch:<6} {float(meta['dev_accuracy']):<22.1f} {fmt(s['cacc']):<18} {fmt(s['asr']):<26}")
PY
done
echo "(test split of Rotten Tomatoes, mean ± 95% CI over $(python3 -c "import json;print(len(json.load(open('$run/eval-$1.json'))['seeds']))") seeds; reports in $run/)"
