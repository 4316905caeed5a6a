#!/usr/bin/env bash
# The exact claims under other CPUs' code paths (part of make test). MKL, ATen and oneDNN
# choose their code path per CPU; the binaries pin each to its AVX-512 path, or AVX2 on a
# CPU without AVX-512 (common::numerics), and these variables, set beforehand, override the
# pins: here they emulate, on this machine, what a CPU without AVX-512 runs and a generic
# x86-64 CPU's paths (make test's plain run covers the AVX-512 pins and, in-process, the
# native paths). Under each, a victim's bits must still depend on its own inputs only
# (common/tests/determinism.rs); under the AVX2 paths an empty poison set must also read
# exactly zero, classifier and language model (tests/pipeline.rs, lm.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
export LIBTORCH=${LIBTORCH:-$PWD/.venv/libtorch}
t0=$SECONDS
# A CPU without AVX-512 (the AVX2 paths): every exact claim; a generic x86-64 CPU (MKL's
# COMPATIBLE branch, ATen's default kernels, oneDNN's SSE4.1): the determinism test.
avx2="MKL_CBWR=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2"
generic="MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41"
echo "test_cpu_paths: $avx2" >&2
env $avx2 cargo test --release -q -p common --test determinism
env $avx2 cargo test --release -q --test pipeline an_empty_poison_set_reads_exactly_zero
env $avx2 cargo test --release -q --test lm
# The Llama victim's agreement with llama.cpp (tolerances, not bits) on another code path.
env $avx2 cargo test --release -q --test llama
echo "test_cpu_paths: $generic" >&2
env $generic cargo test --release -q -p common --test determinism
echo "test_cpu_paths: the exact claims hold under every emulated CPU ($((SECONDS - t0)) s)" >&2
