#!/usr/bin/env bash
# GPU device check (issue 6): merge a >= 2 GB bf16 benchmark model on the GPU and on the CPU,
# prove the GPU output equals base ⊕ adapter tensor by tensor, and report GPU throughput and the
# share of the card's memory bandwidth the merge kernel used.
#
# Prepare on the build machine (needs nvcc, see README "GPU build"):
#   CUDA_COMPUTE_CAP=90 cargo build --release --features cuda
#   mkdir -p device-bin && cp target/release/boft-merge target/release/boft-verify device-bin/
#   cp "$(cargo bench --bench merge --no-run --message-format=json 2>/dev/null \
#        | sed -n 's/.*"executable":"\([^"]*merge-[^"]*\)".*/\1/p' | tail -1)" device-bin/merge-bench
# Run on the GPU machine from the repository root, carrying device-bin:
#   bash scripts/device-check.sh            # writes $OUT/device-check.txt (OUT defaults to ./out)
set -euo pipefail
BIN=${BIN:-device-bin}
WORK=${WORK:-/tmp/boft-device-check}
OUT=${OUT:-out}
SIZE_MB=${SIZE_MB:-2200}
# DEVICE=candle-cpu dry-runs the script on a machine without a GPU.
DEVICE=${DEVICE:-cuda}
mkdir -p "$WORK" "$OUT"
report="$OUT/device-check.txt"
: >"$report"
say() { echo "$*" | tee -a "$report"; }

# A binary linked on a machine without CUDA (see README, "GPU build") finds the driver's and the
# toolkit's libraries here: collect the sonames it needs from wherever this machine has them.
libs=$WORK/lib
mkdir -p "$libs"
for so in libcuda.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
    [ -e "$libs/$so" ] && continue
    found=$(find /usr/local/nvidia /usr/local/cuda/ /usr/lib/x86_64-linux-gnu /opt -name "$so" 2>/dev/null | head -1 || true)
    [ -n "$found" ] && ln -sf "$found" "$libs/$so"
done
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
missing=$(ldd "$BIN/boft-merge" 2>/dev/null | grep 'not found' || true)
[ -z "$missing" ] || echo "warning: $BIN/boft-merge: $missing" >&2
calc() { awk "BEGIN { printf \"%.${2:-3}f\", $1 }"; }

say "date: $(date -u +%FT%TZ)"
say "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv,noheader 2>/dev/null || echo none)"
say "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"

"$BIN/merge-bench" gen --size "$SIZE_MB" --dtype bf16 --block-size 32 --factors 2 --out "$WORK/m"
base="$WORK/m/base"
adapter="$WORK/m/adapter"
bytes=$(du -sb "$base" | cut -f1)
say "model: $(du -sh "$base" | cut -f1) bf16, BOFT b=32, 2 factors on every linear layer"

timed() { # label, command...
    local label=$1; shift
    local t0 t1
    t0=$(date +%s.%N)
    "$@" 2> >(tee -a "$report" >&2)
    t1=$(date +%s.%N)
    say "$label: $(calc "$t1 - $t0") s, $(calc "$bytes / ($t1 - $t0) / 1e9" 2) GB/s of base read"
}

# Warm the page cache once so both runs read from memory.
cat "$base"/*.safetensors >/dev/null
timed "gpu merge" env BOFT_DEVICE_STATS=1 "$BIN/boft-merge" -q --force --base "$base" --adapter "$adapter" -o "$WORK/gpu" --device "$DEVICE"
timed "cpu merge" "$BIN/boft-merge" -q --force --base "$base" --adapter "$adapter" -o "$WORK/cpu"

# Tensor by tensor: the GPU output against base ⊕ adapter recomputed on the CPU (one bf16 ulp),
# every untouched tensor byte-identical, same layout.
"$BIN/boft-verify" "$adapter" --base "$base" --merged "$WORK/gpu" \
    --checks merged-layout,merged-untouched,merged-values | tail -5 | tee -a "$report"
same=0; differ=0
for f in "$WORK/cpu"/*.safetensors; do
    if cmp -s "$f" "$WORK/gpu/$(basename "$f")"; then same=$((same + 1)); else differ=$((differ + 1)); fi
done
say "shards bit-identical to the CPU merge: $same, differing (within the verified ulp): $differ"

# Bandwidth share: the kernel must at least read and write every targeted element once in f32
# (8 bytes); device-stats reports that traffic over the device compute time.
gbps=$(grep -o 'min_traffic_gbps=[0-9.]*' "$report" | tail -1 | cut -d= -f2)
name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
case "$name" in
    *H200*) peak=4800 ;;
    *H100*SXM*|*H100\ 80GB\ HBM3*) peak=3350 ;;
    *H100*) peak=2000 ;;
    *A100*) peak=2039 ;;
    *) peak="" ;;
esac
if [ -n "$peak" ] && [ -n "$gbps" ]; then
    say "merge kernel: $gbps GB/s of minimum f32 traffic = $(calc "100 * $gbps / $peak" 1)% of the $name's $peak GB/s"
fi
rm -rf "$WORK"
