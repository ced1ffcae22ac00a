#!/usr/bin/env bash
# Build the `cuda` feature on a machine with nvcc but without the NVIDIA driver or the CUDA
# libraries (what docs/GPU.md's device check used): link against stub libraries that define the
# symbols candle/cudarc reference, with the sonames of CUDA 13. The real libraries are found at
# run time on the GPU machine (scripts/device-check.sh collects them).
# Needs: nvcc on PATH (README, "GPU build"), gcc, nm. Usage: scripts/build-cuda-offline.sh [cap]
set -euo pipefail
CAP=${1:-90}
TARGET=${CARGO_TARGET_DIR:-target-cuda}
STUBS=$TARGET/cuda-stubs
mkdir -p "$STUBS"
export CARGO_TARGET_DIR=$TARGET CUDA_COMPUTE_CAP=$CAP LIBRARY_PATH=$STUBS
# First pass compiles everything; linking fails until the stubs exist.
cargo build --release --features cuda --bins >/dev/null 2>&1 || true
syms=$( (for f in "$TARGET"/release/deps/lib{cudarc,candle_core,candle_kernels}-*.rlib \
        "$TARGET"/release/build/candle-kernels-*/out/*.a; do nm -u "$f" 2>/dev/null; done) |
    awk '$1 == "U" {print $2}' | grep -E '^(__cuda|cu|nvrtc|curand|cublas)' | sort -u)
classify() { # symbol -> the library that exports it
    case $1 in
        cublasLt*) echo cublasLt ;; cublas*) echo cublas ;; curand*) echo curand ;;
        nvrtc*) echo nvrtc ;; __cuda* | cuda*) echo cudart ;; *) echo cuda ;;
    esac
}
for name in cuda cudart cublas cublasLt curand nvrtc; do
    echo 'void boft_stub_anchor(void) {}' >"$STUBS/$name.c"
done
for s in $syms; do echo "void $s(void) {}" >>"$STUBS/$(classify "$s").c"; done
for lib in cuda:libcuda.so.1 cudart:libcudart.so.13 cublas:libcublas.so.13 \
    cublasLt:libcublasLt.so.13 curand:libcurand.so.10 nvrtc:libnvrtc.so.13; do
    name=${lib%%:*}
    gcc -shared -fPIC -w -o "$STUBS/lib$name.so" -Wl,-soname,"${lib#*:}" "$STUBS/$name.c"
done
cargo build --release --features cuda --bins
echo "built $TARGET/release/boft-merge (linked against stubs in $STUBS)"
