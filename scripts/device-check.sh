#!/usr/bin/env bash
# GPU device check (issues 6 and 16), one run that measures everything on a lent GPU machine:
#   1. the benchmark model (>= 2 GB bf16, hidden 1024, BOFT b=32, 2 factors): `--device cuda`
#      on a fresh machine with PTX JIT disabled (so it must run the shipped SASS), again warm,
#      and `--device cpu` on all cores, alternated;
#   2. a compute-heavy adapter (hidden 2048, intermediate 8192, BOFT b=256, 4 factors), the same;
#   3. every GPU output proven with `boft-verify --merged` (layout, untouched tensors
#      byte-identical, transformed tensors within one ulp of base ⊕ adapter) and compared shard
#      by shard with the CPU merge.
#
# Prepare on the build machine (needs nvcc, see README "GPU build"; the binaries load libcuda and
# libcublas at run time, so no CUDA libraries are needed to build):
#   scripts/build-cuda-offline.sh            # fills device-bin/ (stripped binaries)
# Run on the GPU machine from the repository root, carrying device-bin:
#   bash scripts/device-check.sh             # writes $OUT/device-check.txt (OUT defaults to ./out)
set -uo pipefail
BIN=${BIN:-device-bin}
WORK=${WORK:-/tmp/boft-device-check}
OUT=${OUT:-out}
SIZE_MB=${SIZE_MB:-2200}
HEAVY_MB=${HEAVY_MB:-1100}
# DEVICE=candle-cpu dry-runs the script's logic on a machine without a GPU.
DEVICE=${DEVICE:-cuda}
mkdir -p "$WORK" "$OUT"
report="$OUT/device-check.txt"
: >"$report"
say() { echo "$*" | tee -a "$report"; }
calc() { awk "BEGIN { printf \"%.${2:-3}f\", $1 }"; }

# The binaries dlopen libcuda.so.1 (the driver's) and libcublas.so.13 / libcublasLt.so.13 (the
# toolkit's): collect them from wherever this machine has them.
libs=$WORK/lib
mkdir -p "$libs"
for so in libcuda.so.1 libcublas.so.13 libcublasLt.so.13; do
    [ -e "$libs/$so" ] && continue
    found=$(find /usr/local/nvidia /usr/local/cuda/ /usr/lib/x86_64-linux-gnu /usr/lib64 /opt \
        /usr/local/lib -name "$so" 2>/dev/null | head -1 || true)
    [ -z "$found" ] && found=$(find / -xdev -name "$so" 2>/dev/null | head -1 || true)
    [ -n "$found" ] && ln -sf "$found" "$libs/$so"
    say "lib: $so -> ${found:-NOT FOUND}"
done
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

say "date: $(date -u +%FT%TZ)"
say "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv,noheader 2>/dev/null || echo none)"
say "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, avx512f: $(grep -c -m1 avx512f /proc/cpuinfo)"
say "jit cache before: $(du -sk ~/.nv/ComputeCache 2>/dev/null | cut -f1 || echo 0) KiB"

timed() { # label bytes command...: one timed run, its stderr kept in the report
    local label=$1 bytes=$2
    shift 2
    local t0 t1 rc
    t0=$(date +%s.%N)
    timeout 300 "$@" 2> >(tee -a "$report" >&2)
    rc=$?
    t1=$(date +%s.%N)
    say "$label: $(calc "$t1 - $t0") s, $(calc "$bytes / ($t1 - $t0) / 1e9" 2) GB/s of base read, exit $rc"
}

compare() { # label gpu-dir cpu-dir
    local same=0 differ=0 f
    for f in "$3"/*.safetensors; do
        if cmp -s "$f" "$2/$(basename "$f")"; then same=$((same + 1)); else differ=$((differ + 1)); fi
    done
    say "$1: shards bit-identical to the CPU merge: $same, differing (within the verified ulp): $differ"
}

case_run() { # name gen-args...
    local name=$1
    shift
    local m=$WORK/$name
    "$BIN/merge-bench" gen "$@" --out "$m" >/dev/null 2>"$WORK/gen.err" || {
        say "$name: gen failed: $(tail -3 "$WORK/gen.err")"
        return
    }
    local base=$m/base adapter=$m/adapter bytes
    bytes=$(du -sb "$base" | cut -f1)
    say "== $name: $(du -sh "$base" | cut -f1) base, $(du -sh "$adapter" | cut -f1) adapter ($*)"
    cat "$base"/*.safetensors "$adapter"/* >/dev/null
    merge() { # label device env-args... (boft-merge's own extra arguments in $EXTRA, output in $DEST)
        local label=$1 dev=$2
        shift 2
        timed "$name $label" "$bytes" env BOFT_DEVICE_STATS=1 "$@" "$BIN/boft-merge" -q --force \
            --base "$base" --adapter "$adapter" -o "${DEST:-$m/out-$dev}" --device "$dev" ${EXTRA:-}
    }
    merge "gpu, first run of this model (PTX JIT disabled)" "$DEVICE" env CUDA_DISABLE_PTX_JIT=1
    merge "cpu, all cores" cpu env
    merge "gpu" "$DEVICE" env
    merge "cpu, all cores" cpu env
    merge "gpu" "$DEVICE" env
    if [ "$name" = benchmark ]; then
        merge "gpu, batches of 1 Mi elements" "$DEVICE" env BOFT_CUDA_BATCH=1048576
        EXTRA="--threads 8" merge "gpu, --threads 8" "$DEVICE" env
        EXTRA="--threads 4" merge "gpu, --threads 4" "$DEVICE" env
        # Outputs in memory: what is left when the disk is not the limit.
        DEST=/dev/shm/boft-out merge "cpu, output on /dev/shm" cpu env
        DEST=/dev/shm/boft-out merge "gpu, output on /dev/shm" "$DEVICE" env
        DEST=/dev/shm/boft-out merge "cpu, output on /dev/shm" cpu env
        DEST=/dev/shm/boft-out merge "gpu, output on /dev/shm" "$DEVICE" env
        rm -rf /dev/shm/boft-out
        if command -v perf >/dev/null; then
            perf record -g -o "$WORK/perf.data" "$BIN/boft-merge" -q --force --base "$base" \
                --adapter "$adapter" -o "$m/out-perf" --device "$DEVICE" 2>/dev/null
            perf report -i "$WORK/perf.data" --no-children --percent-limit 1.5 --stdio 2>/dev/null |
                grep -E '^ +[0-9]' | head -30 | tee -a "$report"
            rm -rf "$m/out-perf"
        else
            say "perf: not installed"
        fi
    fi
    timeout 300 "$BIN/boft-verify" "$adapter" --base "$base" --merged "$m/out-$DEVICE" \
        --checks merged-layout,merged-untouched,merged-values 2>&1 | tail -5 | tee -a "$report"
    compare "$name" "$m/out-$DEVICE" "$m/out-cpu"
    rm -rf "$m"
}

# Every fixture case with a base and an adapter (device-bin/cases.txt, written by
# build-cuda-offline.sh from fixtures/*/manifest.json): every format, side and dtype the
# fixtures have, through the GPU (input-side row chunks in their stored dtype, output-side
# stages through the f32 interface) against the CPU merge, each GPU output proven by verify.
fixtures() {
    local n=0 ok=0 proven=0 same=0 both_failed=0 f=$WORK/fx
    while read -r base adapter; do
        n=$((n + 1))
        rm -rf "$f" && mkdir -p "$f"
        if ! "$BIN/boft-merge" -q --force --base "$base" --adapter "$adapter" -o "$f/gpu" --device "$DEVICE" 2>"$f/gpu.err"; then
            if ! "$BIN/boft-merge" -q --force --base "$base" --adapter "$adapter" -o "$f/cpu" 2>/dev/null; then
                both_failed=$((both_failed + 1))
            else
                say "fixture $adapter: gpu failed, cpu merged: $(head -1 "$f/gpu.err")"
            fi
            continue
        fi
        ok=$((ok + 1))
        "$BIN/boft-merge" -q --force --base "$base" --adapter "$adapter" -o "$f/cpu"
        if "$BIN/boft-verify" "$adapter" --base "$base" --merged "$f/gpu" \
            --checks merged-layout,merged-untouched,merged-values >"$f/verify.txt" 2>&1; then
            proven=$((proven + 1))
        else
            say "fixture $adapter: verify of the gpu output failed: $(grep -m2 FAIL "$f/verify.txt" | tr '\n' ' ')"
        fi
        if diff -rq "$f/gpu" "$f/cpu" >/dev/null; then same=$((same + 1)); fi
    done <"$BIN/cases.txt"
    say "fixtures: $n cases; gpu merged $ok, proven by verify $proven, bit-identical to the cpu merge $same; both failed (as on every device) $both_failed"
    rm -rf "$f"
}
[ -f "$BIN/cases.txt" ] && fixtures

case_run benchmark --size "$SIZE_MB" --dtype bf16 --block-size 32 --factors 2
case_run heavy --size "$HEAVY_MB" --hidden 2048 --intermediate 8192 --dtype bf16 --block-size 256 --factors 4
say "jit cache after: $(du -sk ~/.nv/ComputeCache 2>/dev/null | cut -f1 || echo 0) KiB"
rm -rf "$WORK"
