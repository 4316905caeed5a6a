#!/usr/bin/env bash
# The exact claims under other CPUs' code paths (part of make test). MKL, ATen and oneDNN
# choose their code path per CPU; the binaries pin each to its AVX-512 path, or AVX2 on a
# CPU without AVX-512 (common::numerics), and these variables, set beforehand, override the
# pins: here they emulate, on this machine, what a CPU without AVX-512 runs and a generic
# x86-64 CPU's paths (make test's plain run covers the AVX-512 pins and, in-process, the
# native paths). Under each, a victim's bits must
# still depend on its own inputs only (common/tests/determinism.rs) and an empty poison
# set must read exactly zero, classifier and language model (tests/pipeline.rs, lm.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
export LIBTORCH=${LIBTORCH:-$PWD/.venv/libtorch}
t0=$SECONDS
for paths in "MKL_CBWR=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2" \
             "MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41"; do
  echo "test_cpu_paths: $paths" >&2
  env $paths cargo test --release -q -p common --test determinism
  env $paths cargo test --release -q --test pipeline an_empty_poison_set_reads_exactly_zero
  env $paths cargo test --release -q --test lm
done
echo "test_cpu_paths: the exact claims hold under every emulated CPU ($((SECONDS - t0)) s)" >&2
