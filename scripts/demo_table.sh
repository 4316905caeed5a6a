#!/usr/bin/env bash
# Prints the demo's summary table (stdout) from the victims and reports in a run folder:
#   scripts/demo_table.sh RUN ARCH...   (rendered by `report victims-table`)
set -euo pipefail
: "${BIN:=target/release}"
"$BIN/report" victims-table "$@"
