#!/usr/bin/env bash
# The CUDA tier on a real GPU: builds lowtide with `--features cuda`, runs its device unit test
# and the end-to-end example (load, patch, unload under a reserve, reload, verify, throughput).
# Usage: scripts/gpu-check.sh [SIZE]   (SIZE of the synthetic model, default 2GiB)
set -euo pipefail
cd "$(dirname "$0")/.."
size="${1:-2GiB}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
cargo test --release -p lowtide --features cuda --lib device::cuda -- --nocapture
cargo run --release -p lowtide --features cuda --example gpu_check -- "$size"
