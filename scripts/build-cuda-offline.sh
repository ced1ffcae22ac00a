#!/usr/bin/env bash
# Build the `cuda` feature on a machine without a GPU, the NVIDIA driver or the CUDA libraries
# (how docs/GPU.md's device check was built), and put stripped binaries for
# scripts/device-check.sh in device-bin/. Only nvcc is needed, for kernels/boft.cu: the binaries
# load libcuda and libcublas at run time. nvcc comes from PATH, or from a venv made as README's
# "GPU build" says (CUDA_VENV, default ~/cuda-venv).
# Usage: scripts/build-cuda-offline.sh [compute capabilities, default 90]
set -euo pipefail
CAP=${1:-90}
TARGET=${CARGO_TARGET_DIR:-target-cuda}
if ! command -v nvcc >/dev/null; then
    venv=${CUDA_VENV:-$HOME/cuda-venv}
    cu=$("$venv/bin/python" -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13'))")
    export PATH="$cu/bin:$PATH"
fi
export CARGO_TARGET_DIR=$TARGET CUDA_COMPUTE_CAP=$CAP
cargo build --release --locked --features cuda --bins --benches
bench=$(cargo bench --locked --features cuda --bench merge --no-run --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*merge-[^"]*\)".*/\1/p' | tail -1)
mkdir -p device-bin
cp "$TARGET/release/boft-merge" "$TARGET/release/boft-verify" device-bin/
cp "$bench" device-bin/merge-bench
strip --strip-debug device-bin/boft-merge device-bin/boft-verify device-bin/merge-bench
# The fixture cases device-check.sh runs through the GPU: "base adapter" per line.
python3 - >device-bin/cases.txt <<'PY'
import glob, json, os
for m in sorted(glob.glob("fixtures/*/manifest.json")):
    cases = json.load(open(m))
    if isinstance(cases, dict):
        cases = cases.get("cases", [])
    for c in cases:
        if isinstance(c, dict) and isinstance(c.get("base"), str) and isinstance(c.get("adapter"), str):
            d = os.path.dirname(m)
            print(os.path.join(d, c["base"]), os.path.join(d, c["adapter"]))
PY
ls -l device-bin
