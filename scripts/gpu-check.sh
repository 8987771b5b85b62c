#!/usr/bin/env bash
# The CUDA tier on a real GPU: builds lowtide with `--features cuda`, runs its device unit test
# and the end-to-end example (load, patch, unload under a reserve, reload, verify, throughput),
# then, where scripts/test has made its venv, lowtide's ComfyUI nodes against stock ComfyUI on
# the GPU (images byte for byte, as on the CPU).
# Usage: scripts/gpu-check.sh [SIZE]   (SIZE of the synthetic model, default 2GiB)
set -euo pipefail
cd "$(dirname "$0")/.."
size="${1:-2GiB}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
cargo test --release -p lowtide --features cuda --lib device::cuda -- --nocapture
cargo run --release -p lowtide --features cuda --example gpu_check -- "$size"
venv=target/python-venv
if [ -x "$venv/bin/python" ]; then
    (cd crates/lowtide-py && VIRTUAL_ENV="$PWD/../../$venv" "../../$venv/bin/maturin" develop --quiet)
    (cd crates/lowtide-py && LOWTIDE_COMFYUI_DEVICE=gpu "../../$venv/bin/python" -m pytest -q \
        tests/test_comfyui_stock.py tests/test_comfyui_lowtide.py)
fi
